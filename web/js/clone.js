/**
 * The Clone, Export and Import dialogs. Each sends its request, then turns into a live progress bar of the
 * job it started (moved by `job.progress` events, with Cancel) and ends with what was made: the clone or the
 * imported VM to open, the export's file and size. Closing a dialog does not stop its job; the VM's Disks
 * and Snapshots tabs keep showing it, and a message says when it ends.
 *
 * Example (js/app.js through js/disks.js):
 *   initClone({ go });
 *   openClone({ id, name, state });   openExport(vm);   openImport();
 */
import * as api from './api.js';
import * as jobs from './jobs.js';
import { bridge, chosen, choices, field, formatBinary, openSheet } from './sheet.js';
import { h, toast } from './ui.js';

let go = () => {};
let folders = null;             // GET /api/folders, read once

export function initClone(options) {
  go = options.go;
}

async function knownFolders() {
  if (!folders) folders = await api.request('GET', '/api/folders');
  return folders;
}

/** After the request: the sheet shows the job's bar, then `onDone(job)`'s words and buttons. */
async function follow(sheet, job, label, onDone) {
  const remembered = jobs.remember(job);
  sheet.running(h('div', { class: 'sheet-job' }, jobs.progressBlock(remembered, label)));
  const finished = await jobs.finished(remembered.id);
  if (!sheet.element.isConnected) {
    // Closed meanwhile: the job ran on; tell how it ended.
    if (finished.state === 'done') toast(`${label}: done`, 'ok');
    else if (finished.state === 'failed') toast(`${label} failed: ${finished.error}`, 'error');
    return;
  }
  if (finished.state !== 'done') return;   // the bar says failed or cancelled, with the reason
  const outcome = onDone(finished);
  sheet.content.append(h('div', { class: 'sheet-outcome', role: 'status' }, outcome.text));
  if (outcome.button) sheet.cancel.before(outcome.button);
  outcome.button?.focus();
}

export function openClone(vm) {
  const name = h('input', { type: 'text', id: 'clone-name', value: `${vm.name}-clone`, autocomplete: 'off' });
  openSheet({
    id: 'clone-dialog', title: `Clone ${vm.name}`,
    intro: 'The clone is a new VM with the same settings and disks, its own identity (UUID) and new network addresses.',
    body: [
      field('name', 'Name of the clone', name),
      h('fieldset', { class: 'choice-set' }, h('legend', {}, 'Disks'),
        choices('clone-kind', [['full', 'Full copy', 'Independent of the original; takes the space of its disks'],
                               ['linked', 'Linked clone', 'Fast and small: built on the original’s disks, which then cannot be deleted or reverted while the clone exists']],
                'full')),
      h('fieldset', { class: 'choice-set' }, h('legend', {}, 'TPM'),
        choices('clone-tpm', [['fresh', 'Fresh TPM', 'A new, empty TPM (the usual choice)'],
                              ['copy', 'Copy the TPM', 'The original’s keys and measurements (e.g. for BitLocker to keep working)']],
                'fresh')),
    ],
    submit: 'Clone',
    onSubmit: async (sheet) => {
      const linked = chosen(sheet.element, 'clone-kind') === 'linked';
      const job = await api.request('POST', `/api/vms/${encodeURIComponent(vm.id)}/clone`,
                                    { name: name.value.trim(), linked, tpm: chosen(sheet.element, 'clone-tpm') });
      await follow(sheet, job, `${linked ? 'Linked clone' : 'Clone'} of ${vm.name}`, (done) => ({
        text: `✓ ${done.result.name} is ready${linked ? ` (linked to ${vm.name})` : ''}.`,
        button: h('button', { type: 'button', class: 'primary', id: 'clone-open',
                              onclick: () => { sheet.close(); go(`#/vm/${done.result.id}/details`); } }, `Open ${done.result.name}`),
      }));
    },
  });
}

export async function openExport(vm) {
  let places;
  try {
    places = await knownFolders();
  } catch (error) {
    toast(error.message, 'error');
    return;
  }
  const folder = h('input', { type: 'text', id: 'export-folder', value: places.export, autocomplete: 'off' });
  const fileName = h('input', { type: 'text', id: 'export-name', value: `${vm.name}.7z`, autocomplete: 'off' });
  const browse = h('button', { type: 'button', class: 'needs-bridge', onclick: async () => {
    const picked = await bridge()?.pick_folder();
    if (picked) { folder.value = picked; update(); }
  } }, 'Browse…');
  const target = h('code', { id: 'export-target' });
  const join = () => {
    const base = folder.value.trim().replace(/[\\/]+$/, '');
    return `${base}${places.separator}${fileName.value.trim()}`;
  };
  const update = () => { target.textContent = join(); };
  folder.addEventListener('input', update);
  fileName.addEventListener('input', update);
  update();
  openSheet({
    id: 'export-dialog', title: `Export ${vm.name}`,
    intro: 'One .7z file with the VM’s settings, disks, UEFI variables, TPM state and snapshots; “Import…” on any ' +
           'Thalunix turns it back into a VM. Each file in it is checked on the way back.',
    body: [field('folder', 'Folder', h('div', { class: 'row' }, folder, browse),
                 bridge() ? null : 'Type the full path of an existing folder.'),
           field('file_name', 'File name', fileName),
           h('p', { class: 'hint export-target' }, 'Writes ', target)],
    submit: 'Export',
    onSubmit: async (sheet) => {
      if (!folder.value.trim()) throw { field: 'folder', message: 'Give the folder to write the export into' };
      if (!/\.7z$/i.test(fileName.value.trim())) throw { field: 'file_name', message: 'The file name must end in .7z' };
      const job = await api.request('POST', `/api/vms/${encodeURIComponent(vm.id)}/export`, { file: join() });
      await follow(sheet, job, `Export of ${vm.name}`, (done) => ({
        text: h('span', {}, `✓ Exported to `, h('code', { id: 'export-result' }, done.result.file),
                ` (${formatBinary(done.result.size)})`),
      }));
    },
  });
}

export function openImport() {
  const file = h('input', { type: 'text', id: 'import-file', autocomplete: 'off', placeholder: 'full path of a .7z export' });
  const browse = h('button', { type: 'button', class: 'needs-bridge', onclick: async () => {
    const picked = await bridge()?.pick_file('export');
    if (picked) file.value = picked;
  } }, 'Browse…');
  const name = h('input', { type: 'text', id: 'import-name', autocomplete: 'off', placeholder: 'keep the name it was exported with' });
  openSheet({
    id: 'import-dialog', title: 'Import a VM',
    intro: 'From a .7z file made by “Export…”. Every file in it is checked against its manifest before the VM appears.',
    body: [field('file', 'Export file', h('div', { class: 'row' }, file, browse)),
           field('name', 'Name (optional)', name, 'A VM with the same name is kept; the import then gets a new one.')],
    submit: 'Import',
    onSubmit: async (sheet) => {
      const job = await api.request('POST', '/api/import', { file: file.value.trim(), name: name.value.trim() || null });
      await follow(sheet, job, 'Import', (done) => ({
        text: `✓ Imported as ${done.result.name}${done.result.renamed ? ` (renamed: ${done.result.original_name} exists)` : ''}.`,
        button: h('button', { type: 'button', class: 'primary', id: 'import-open',
                              onclick: () => { sheet.close(); go(`#/vm/${done.result.id}/details`); } }, `Open ${done.result.name}`),
      }));
    },
  });
}
