/**
 * The embedded graphical screen of one VM: noVNC's RFB client on QEMU's own websocket VNC
 * (ws://127.0.0.1:PORT), with the password QEMU was given at this start (GET /api/vms/{id}/vnc).
 *
 * noVNC 1.x ships its client as ES modules in core/ (package "type": "module"), so the page
 * imports core/rfb.js straight from /vendor/ — no bundler, and it loads in Chromium and WebKitGTK.
 *
 * Example:
 *   const screen = new VncScreen(container, vm.id, (status, text) => label.textContent = text);
 *   await screen.connect();
 *   screen.sendCtrlAltDel();
 *   screen.disconnect();
 */
import RFB from '/vendor/@novnc/novnc/core/rfb.js';
import * as api from './api.js';

export class VncScreen {
  constructor(container, vmId, onStatus = () => {}) {
    this.container = container;
    this.vmId = vmId;
    this.onStatus = onStatus;
    this.rfb = null;
    this.closed = false;
  }

  async connect() {
    this.closed = false;
    this.onStatus('connecting', 'Connecting to the screen…');
    let info;
    try {
      info = await api.vncInfo(this.vmId);
    } catch (error) {
      this.onStatus('error', error.message);
      return;
    }
    if (this.closed) return;
    // QEMU serves VNC on 127.0.0.1 only; the page must use the same address, whatever it was opened as.
    const rfb = new RFB(this.container, `ws://${info.host}:${info.websocket_port}`,
                        { credentials: { password: info.password }, shared: true });
    rfb.scaleViewport = true;
    rfb.resizeSession = false;
    rfb.focusOnClick = true;
    rfb.background = 'transparent';
    rfb.addEventListener('connect', () => this.onStatus('connected', 'Connected — click the screen to type into it'));
    rfb.addEventListener('disconnect', (event) => {
      if (this.rfb === rfb) this.rfb = null;
      if (!this.closed) {
        this.onStatus('disconnected', event.detail.clean ? 'The screen was closed.'
                                                         : 'Lost the connection to the screen.');
      }
    });
    rfb.addEventListener('securityfailure', (event) => {
      this.onStatus('error', `The screen refused the password (${event.detail.reason || 'security failure'}); ` +
                             'restart the VM to get a new one.');
    });
    rfb.addEventListener('credentialsrequired', () => {
      rfb.sendCredentials({ password: info.password });
    });
    this.rfb = rfb;
  }

  get connected() {
    return this.rfb !== null;
  }

  sendCtrlAltDel() {
    this.rfb?.sendCtrlAltDel();
  }

  focus() {
    this.rfb?.focus();
  }

  disconnect() {
    this.closed = true;
    if (this.rfb) {
      const rfb = this.rfb;
      this.rfb = null;
      try { rfb.disconnect(); } catch (e) { /* already gone */ }
    }
    this.container.replaceChildren();
  }
}
