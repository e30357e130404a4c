/**
 * A VM's storage in its view: the Disks tab (list with size, allocation, format and bus; add a new or an
 * existing image; grow — the refusal to shrink shown as the API words it; convert raw ⇄ qcow2 with a live
 * progress bar; check and repair) and the Snapshots tab (js/snapshots.js). Also the entry points of the
 * Clone, Export and Import dialogs (js/clone.js), so the page wires one module.
 *
 * Long operations are jobs: their bars move by `job.progress` events (js/jobs.js), never by polling. While
 * the VM runs, disks are plugged in and out and grown live; converting and checking wait for it to stop.
 *
 * Example (js/app.js):
 *   import * as storage from './disks.js';
 *   storage.initStorage({ go });
 *   storage.renderPanel('disks', panelElement, { id, name, state });
 *   api.events({ 'job.progress': storage.onProgress, ready: storage.onReconnect, … });
 */
import * as api from './api.js';
import * as jobs from './jobs.js';
import { renderSnapshots } from './snapshots.js';
import { bridge, chosen, choices, field, formatBinary, openSheet } from './sheet.js';
import { confirmAction, h, toast } from './ui.js';

import { initClone } from './clone.js';

export { openClone, openExport, openImport } from './clone.js';

const BUSES = [['virtio', 'virtio (fast; Linux has drivers)'], ['scsi', 'SCSI (virtio-scsi)'], ['nvme', 'NVMe'],
               ['sata', 'SATA'], ['ide', 'IDE']];
const HOTPLUG_BUSES = new Set(['virtio', 'scsi', 'nvme']);
const STOPPED = new Set(['stopped', 'crashed']);
const UP = new Set(['starting', 'running', 'paused', 'stopping']);

let shown = null;               // { tab, panel, vm } of the storage tab on screen

const vmPath = (vm, rest = '') => `/api/vms/${encodeURIComponent(vm.id)}${rest}`;
const diskPath = (vm, disk, rest = '') => vmPath(vm, `/disks/${encodeURIComponent(disk)}${rest}`);

/** A size the API reads back exactly (8G, 1536M), for prefilled fields. */
function sizeText(bytes) {
  if (bytes % 2 ** 30 === 0) return `${bytes / 2 ** 30}G`;
  if (bytes % 2 ** 20 === 0) return `${bytes / 2 ** 20}M`;
  return `${bytes}`;
}

/** `go(hash)` opens a page of the app (a new clone or import is shown with it). */
export function initStorage({ go }) {
  initClone({ go });
}

/** Draw tab `tab` ('disks' or 'snapshots') of VM `vm` ({ id, name, state }) into `panel`. */
export function renderPanel(tab, panel, vm) {
  shown = { tab, panel, vm: { ...vm } };
  if (tab === 'snapshots') renderSnapshots(panel, shown.vm, { convert: (disk) => convert(shown.vm, disk, 'qcow2'),
                                                              jobsStrip, refresh: () => redraw() });
  else renderDisks(panel, shown.vm);
}

/** The VM on screen changed state (or the view closed, vm null): its tab follows. */
export function onVmState(vm) {
  if (!shown) return;
  if (!vm || vm.id !== shown.vm.id) { if (!vm) shown = null; return; }
  if (shown.vm.state === vm.state) return;
  shown.vm = { ...shown.vm, ...vm };
  if (shown.panel.isConnected && !shown.panel.hidden) redraw();
}

function redraw() {
  if (shown?.panel.isConnected) renderPanel(shown.tab, shown.panel, shown.vm);
}

export function onProgress(event) {
  jobs.onProgress(event);
  // A job of the VM on screen started or ended (perhaps from another window): its tab shows the change.
  if (shown && event.vm === shown.vm.id && event.job && (event.state !== 'running' || !shown.panel.querySelector(
    `.job-progress[data-job="${CSS.escape(event.job)}"]`))) {
    if (!shown.panel.hidden) redraw();
  }
}

export function onReconnect() {
  jobs.resync().then(() => { if (shown && !shown.panel.hidden) redraw(); });
}

/** The running jobs of a VM, each with its bar (whoever started them). */
export function jobsStrip(vm) {
  const running = jobs.runningFor(vm.id);
  if (!running.length) return null;
  return h('div', { class: 'vm-jobs', 'aria-label': 'Operations in progress' },
    running.map((job) => h('div', { class: 'vm-job' }, h('div', { class: 'vm-job-title' }, job.title || job.kind),
                           jobs.progressBlock(job, job.title || job.kind))));
}

// -- the Disks tab -------------------------------------------------------------------------------------------
async function renderDisks(panel, vm) {
  const table = h('div', { class: 'disk-table-wrap' }, h('p', { class: 'muted' }, 'Loading the disks…'));
  const running = UP.has(vm.state);
  panel.replaceChildren(h('section', { class: 'storage', id: 'disks-panel' },
    h('div', { class: 'storage-head' },
      h('div', {},
        h('h2', {}, 'Disks'),
        h('p', { class: 'hint' }, running
          ? 'The VM is running: disks can be added (virtio, SCSI or NVMe), removed and grown now; converting and checking wait until it is stopped.'
          : 'Size is what the guest sees; space used is what the image takes on this computer.')),
      h('span', { class: 'spacer' }),
      h('button', { type: 'button', class: 'primary', id: 'disk-add', onclick: () => addDialog(vm) }, '+ Add disk…')),
    jobsStrip(vm), table));
  let rows;
  try {
    rows = await api.request('GET', vmPath(vm, '/disks'));
  } catch (error) {
    table.replaceChildren(h('p', { class: 'form-error' }, error.message));
    return;
  }
  if (!rows.length) {
    table.replaceChildren(h('p', { class: 'panel-note' }, 'This VM has no disks. Add one to install a system on it.'));
    return;
  }
  const busy = jobs.runningFor(vm.id).length > 0;
  table.replaceChildren(h('table', { class: 'disk-table', id: 'disk-table' },
    h('thead', {}, h('tr', {}, ['Disk', 'Size', 'Space used', 'Format', 'Bus', ''].map((text) => h('th', { scope: 'col' }, text)))),
    h('tbody', {}, rows.flatMap((disk) => diskRows(vm, disk, busy)))));
}

function diskRows(vm, disk, busy) {
  const stopped = STOPPED.has(vm.state);
  const inside = disk.path.startsWith(`vms/${vm.id}/`);
  const other = disk.format === 'raw' ? 'qcow2' : 'raw';
  const extra = h('td', { colspan: 6, class: 'disk-extra' });
  const button = (label, handler, extraAttributes = {}) => h('button', { type: 'button', onclick: handler,
                                                                         disabled: busy, ...extraAttributes }, label);
  const badges = [
    disk.readonly ? h('span', { class: 'badge' }, 'read-only') : null,
    disk.backing_file ? h('span', { class: 'badge linked', title: `Built on ${disk.backing_file}` }, 'linked') : null,
    disk.snapshots?.length ? h('span', { class: 'badge', title: disk.snapshots.join(', ') },
                               `${disk.snapshots.length} snapshot${disk.snapshots.length === 1 ? '' : 's'}`) : null,
    disk.exists ? null : h('span', { class: 'badge state-crashed' }, 'file missing'),
  ];
  return [
    h('tr', { class: 'disk-row', dataset: { disk: disk.id, format: disk.format } },
      h('td', { class: 'disk-name' },
        h('div', {}, h('strong', {}, disk.id), ...badges),
        // Images in the VM's own folder by name; others by their whole path (its end kept in view).
        h('code', { class: `disk-file${inside ? '' : ' outside'}`, title: disk.file },
          inside ? disk.file.split(/[\\/]/).pop() : disk.file)),
      h('td', { class: 'num disk-size' }, disk.virtual_size ? formatBinary(disk.virtual_size) : '—'),
      h('td', { class: 'num' }, disk.actual_size !== undefined && disk.actual_size !== null ? formatBinary(disk.actual_size) : '—'),
      h('td', {}, disk.format),
      h('td', {}, disk.bus),
      h('td', { class: 'disk-actions' },
        button('Grow…', () => growDialog(vm, disk), { class: 'disk-grow', disabled: busy || !disk.exists || disk.readonly }),
        button(`Convert to ${other}`, () => convert(vm, disk.id, other), {
          class: 'disk-convert', disabled: busy || !stopped || !disk.exists,
          title: stopped ? `Rewrite the image as ${other}${other === 'qcow2' ? ' (snapshots need it)' : ''}` : 'Stop the VM to convert its disks' }),
        button('Check', () => check(vm, disk, extra), {
          class: 'disk-check', disabled: busy || !stopped || disk.format !== 'qcow2' || !disk.exists,
          title: disk.format !== 'qcow2' ? 'Only qcow2 images have metadata to check' : stopped ? 'Look for errors and leaked space' : 'Stop the VM to check its disks' }),
        button('Remove…', () => remove(vm, disk), { class: 'disk-remove danger-outline' }))),
    h('tr', { class: 'disk-extra-row', dataset: { disk: disk.id } }, extra),
  ];
}

async function convert(vm, diskId, format) {
  try {
    const job = jobs.remember(await api.request('POST', diskPath(vm, diskId, '/convert'), { format }));
    redraw();
    const done = await jobs.finished(job.id);
    if (done.state === 'done') toast(`Disk ${diskId} of ${vm.name} is now ${format}`, 'ok');
    else if (done.state === 'failed') toast(done.error || `Converting ${diskId} failed`, 'error');
    redraw();
  } catch (error) {
    toast(error.message, 'error');
  }
}

async function check(vm, disk, cell, repair = null) {
  cell.replaceChildren(h('p', { class: 'muted check-result' }, repair ? 'Repairing…' : 'Checking…'));
  try {
    const result = await api.request('POST', diskPath(vm, disk.id, '/check'), repair ? { repair } : {});
    const report = result.report || {};
    const problems = [report['check-errors'] ? `${report['check-errors']} errors while checking` : null,
                      report.corruptions ? `${report.corruptions} corruptions` : null,
                      report.leaks ? `${report.leaks} leaked clusters (space used by nothing)` : null].filter(Boolean);
    cell.replaceChildren(h('div', { class: `check-result ${result.clean ? 'clean' : 'dirty'}`, role: 'status', dataset: { clean: String(result.clean) } },
      result.clean ? `✓ ${disk.id}: no errors, no leaked clusters${repair ? ' (repaired)' : ''}`
                   : `${disk.id}: ${problems.join(', ')}`,
      result.clean ? null : h('span', { class: 'check-buttons' },
        report.leaks && !report.corruptions ? h('button', { type: 'button', onclick: () => check(vm, disk, cell, 'leaks') }, 'Repair leaks') : null,
        h('button', { type: 'button', class: 'danger-outline', onclick: () => check(vm, disk, cell, 'all') }, 'Repair all'))));
  } catch (error) {
    cell.replaceChildren(h('p', { class: 'form-error' }, error.message));
  }
}

async function remove(vm, disk) {
  const answer = await confirmAction({
    title: `Remove ${disk.id} from ${vm.name}?`,
    text: UP.has(vm.state) ? 'The VM is running: the guest is asked to release the disk first (unmount it there).'
                           : 'The VM no longer sees this disk. Its image stays unless you tick the box.',
    ok: 'Remove', checkbox: 'Also delete its image file (only an image in the VM’s own folder is deleted)' });
  if (!answer) return;
  try {
    const result = await api.request('DELETE', diskPath(vm, disk.id, answer.checked ? '?delete_file=true' : ''));
    toast(`Removed ${disk.id}${result.file_deleted ? ' and deleted its image' : `; its image stays at ${disk.file}`}`, 'ok');
  } catch (error) {
    toast(error.message, 'error');
  }
  redraw();
}

function growDialog(vm, disk) {
  const size = h('input', { type: 'text', id: 'grow-size', value: sizeText(disk.virtual_size || 0), autocomplete: 'off' });
  openSheet({
    id: 'grow-dialog', title: `Grow ${disk.id}`,
    intro: `Now ${formatBinary(disk.virtual_size)}. A disk only grows here: shrinking would cut off whatever the ` +
           'guest keeps at its end.',
    body: [field('size', 'New size', size, UP.has(vm.state)
      ? 'The VM is running: the guest sees the new size at once; grow its partition inside it afterwards.'
      : 'The guest sees the new size at its next start; grow its partition inside it afterwards.')],
    submit: 'Grow',
    onSubmit: async (sheet) => {
      const row = await api.request('POST', diskPath(vm, disk.id, '/resize'), { size: size.value.trim() });
      sheet.close();
      toast(row.changed ? `${disk.id} is now ${formatBinary(row.virtual_size)}` : `${disk.id} already has that size`, 'ok');
      redraw();
    },
  });
}

function addDialog(vm) {
  const running = UP.has(vm.state);
  const buses = running ? BUSES.filter(([bus]) => HOTPLUG_BUSES.has(bus)) : BUSES;
  const busSelect = h('select', { id: 'add-bus' }, buses.map(([value, label]) => h('option', { value }, label)));
  const size = h('input', { type: 'text', id: 'add-size', value: '8G', autocomplete: 'off' });
  const format = h('select', { id: 'add-format', title: 'qcow2 grows as it is used and holds snapshots; raw is a plain file' },
                   h('option', { value: 'qcow2' }, 'qcow2 (recommended)'), h('option', { value: 'raw' }, 'raw'));
  const path = h('input', { type: 'text', id: 'add-path', autocomplete: 'off', placeholder: 'full path of a .qcow2 or .img file' });
  const browse = h('button', { type: 'button', class: 'needs-bridge', onclick: async () => {
    const picked = await bridge()?.pick_file('disk');
    if (picked) path.value = picked;
  } }, 'Browse…');
  const readonly = h('input', { type: 'checkbox', id: 'add-readonly' });
  const fresh = h('div', { class: 'add-new' }, h('div', { class: 'grid2' }, field('size', 'Size', size), field('format', 'Format', format)));
  const existing = h('div', { class: 'add-existing', hidden: true },
    field('path', 'Image file', h('div', { class: 'row' }, path, browse),
          bridge() ? null : 'Type the full path; the image stays where it is.'),
    h('label', { class: 'check' }, readonly, ' Read-only (the guest cannot change it)'));
  const mode = choices('add-mode', [['new', 'New empty disk', 'Made in the VM’s folder'],
                                    ['existing', 'Existing image', 'A disk image already on this computer']], 'new');
  mode.addEventListener('change', () => {
    const isNew = chosen(mode, 'add-mode') === 'new';
    fresh.hidden = !isNew;
    existing.hidden = isNew;
  });
  openSheet({
    id: 'add-disk-dialog', title: `Add a disk to ${vm.name}`,
    intro: running ? 'The VM is running: the disk is plugged in at once.' : null,
    body: [mode, fresh, existing, field('bus', 'Bus', busSelect, running ? 'While the VM runs only virtio, SCSI and NVMe disks can be plugged in.' : null)],
    submit: 'Add disk',
    onSubmit: async (sheet) => {
      const body = chosen(sheet.element, 'add-mode') === 'new'
        ? { size: size.value.trim(), format: format.value, bus: busSelect.value }
        : { path: path.value.trim(), bus: busSelect.value, readonly: readonly.checked };
      const row = await api.request('POST', vmPath(vm, '/disks'), body);
      sheet.close();
      toast(`Added ${row.id} (${formatBinary(row.virtual_size)}, ${row.format}, ${row.bus})`, 'ok');
      redraw();
    },
  });
}
