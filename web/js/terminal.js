/**
 * The interactive serial terminal of one VM (xterm.js).
 *
 * Output: the backlog from GET /api/vms/{id}/console, then live `vm.serial` events from the
 * page's one event stream (app.js calls `feed`). Input: every keystroke goes out through
 * POST /api/vms/{id}/console, in order — one request at a time, keystrokes typed meanwhile
 * travel together in the next one.
 *
 * Example:
 *   const term = new SerialTerminal(container, vm.id);
 *   await term.open();
 *   term.feed('more output');   // from an SSE vm.serial event
 *   term.dispose();
 */
import { Terminal } from '/vendor/@xterm/xterm/lib/xterm.mjs';
import { FitAddon } from '/vendor/@xterm/addon-fit/lib/addon-fit.mjs';
import * as api from './api.js';
import { effectiveTheme, onThemeChange } from './theme.js';
import { toast } from './ui.js';

const THEMES = {
  dark: { background: '#11151c', foreground: '#d8dee9', cursor: '#d8dee9', selectionBackground: '#3b4a63' },
  light: { background: '#fbfbfd', foreground: '#1d2330', cursor: '#1d2330', selectionBackground: '#c6d4f0',
           black: '#1d2330', brightBlack: '#5c6370', white: '#8a8f98', brightWhite: '#5c6370',
           yellow: '#8a6a00', brightYellow: '#8a6a00' },
};

/** The length of the longest end of `text` that `next` starts with. */
function overlap(text, next) {
  for (let size = Math.min(text.length, next.length); size > 0; size--) {
    if (text.endsWith(next.slice(0, size))) return size;
  }
  return 0;
}

export class SerialTerminal {
  constructor(container, vmId) {
    this.container = container;
    this.vmId = vmId;
    // Output that arrives while the backlog is being fetched; it may or may not be in the backlog.
    this.pending = [];
    this.loading = true;
    this.outbox = '';
    this.sending = false;
    this.terminal = new Terminal({
      convertEol: false, cursorBlink: true, scrollback: 5000, fontSize: 14,
      fontFamily: '"DejaVu Sans Mono", "Cascadia Mono", Consolas, Menlo, monospace',
      theme: THEMES[effectiveTheme()],
    });
    this.fit = new FitAddon();
    this.terminal.loadAddon(this.fit);
    this.terminal.open(container);
    this.terminal.onData((data) => this.type(data));
    this.unsubscribe = onThemeChange((mode) => { this.terminal.options.theme = THEMES[mode]; });
    this.resizer = new ResizeObserver(() => this.refit());
    this.resizer.observe(container);
    this.refit();
  }

  refit() {
    // A hidden container has no size; fitting it would shrink the terminal to nothing.
    if (this.container.offsetWidth > 0 && this.container.offsetHeight > 0) {
      try { this.fit.fit(); } catch (e) { /* not laid out yet */ }
    }
  }

  async open() {
    let backlog = '';
    try {
      backlog = (await api.readConsole(this.vmId)).text || '';
    } catch (error) {
      if (error.status !== 409) this.terminal.writeln(`\x1b[2m[${error.message}]\x1b[0m`);
    }
    const later = this.pending.join('');
    this.pending = [];
    this.loading = false;
    this.terminal.write(backlog + later.slice(overlap(backlog, later)));
  }

  /** New serial output from the event stream. */
  feed(text) {
    if (this.loading) this.pending.push(text);
    else this.terminal.write(text);
  }

  note(text) {
    this.terminal.write(`\r\n\x1b[2m[${text}]\x1b[0m\r\n`);
  }

  async type(data) {
    this.outbox += data;
    if (this.sending) return;
    this.sending = true;
    try {
      while (this.outbox) {
        const chunk = this.outbox;
        this.outbox = '';
        await api.typeConsole(this.vmId, chunk);
      }
    } catch (error) {
      this.outbox = '';
      toast(error.message, 'error');
    } finally {
      this.sending = false;
    }
  }

  /** Wipe the screen and the scrollback; what the guest prints next starts at the top. */
  clear() {
    this.terminal.reset();
  }

  focus() {
    this.terminal.focus();
  }

  dispose() {
    this.unsubscribe();
    this.resizer.disconnect();
    this.terminal.dispose();
  }
}
