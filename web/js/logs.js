/**
 * The log panel of one VM: Thalunix's events log, QEMU's own output, or the serial log
 * (GET /api/vms/{id}/log?kind=…), with new lines appended as the event stream brings them
 * (`vm.log` for events, `vm.serial` for serial; QEMU's log is read again when the state changes).
 *
 * Example:
 *   const logs = new LogPanel(container, vm.id);
 *   await logs.load('events');
 *   logs.onLogLine('12:00:01 started');
 */
import * as api from './api.js';
import { h } from './ui.js';

const KINDS = [['events', 'Thalunix events'], ['qemu', 'QEMU output'], ['serial', 'Serial log']];
const MAX_CHARS = 512 * 1024;
// Terminal colour and cursor sequences would show as noise in plain text.
const ESCAPES = /\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b[()][0-9A-Za-z]|\x1b[=>78]|\r/g;

export class LogPanel {
  constructor(container, vmId) {
    this.vmId = vmId;
    this.kind = 'events';
    this.select = h('select', { id: 'log-kind', 'aria-label': 'Which log', onchange: () => this.load(this.select.value) },
      KINDS.map(([value, label]) => h('option', { value }, label)));
    this.follow = h('input', { type: 'checkbox', checked: true, id: 'log-follow' });
    this.text = h('pre', { class: 'log-text', id: 'log-text', tabindex: 0 });
    this.empty = h('p', { class: 'hint log-empty', hidden: true }, 'This log is empty so far.');
    container.append(
      h('div', { class: 'log-toolbar' },
        h('label', {}, 'Log ', this.select),
        h('label', { class: 'check' }, this.follow, ' Follow new lines'),
        h('button', { type: 'button', onclick: () => this.load(this.kind) }, 'Reload')),
      this.empty, this.text);
  }

  async load(kind = this.kind) {
    this.kind = kind;
    this.select.value = kind;
    try {
      const answer = await api.readLog(this.vmId, kind);
      if (kind !== this.kind) return;
      this.text.textContent = answer.text.replace(ESCAPES, '');
    } catch (error) {
      this.text.textContent = error.message;
    }
    this.settle();
  }

  append(text) {
    this.text.append(text.replace(ESCAPES, ''));
    if (this.text.textContent.length > MAX_CHARS) {
      this.text.textContent = this.text.textContent.slice(-MAX_CHARS / 2);
    }
    this.settle();
  }

  settle() {
    this.empty.hidden = this.text.textContent.length > 0;
    if (this.follow.checked) this.text.scrollTop = this.text.scrollHeight;
  }

  onLogLine(line) {
    if (this.kind === 'events') this.append(line + '\n');
  }

  onSerial(text) {
    if (this.kind === 'serial') this.append(text);
  }

  onState() {
    if (this.kind === 'qemu') this.load('qemu');
  }
}
