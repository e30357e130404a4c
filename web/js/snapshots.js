/**
 * The Snapshots tab of a VM: its snapshots as a tree (name, description, date, size; with or without memory
 * state; which one the VM stands on), taking one (live with memory while the VM runs, disks only while it is
 * stopped), reverting with a confirmation, deleting. A VM with a raw disk cannot hold snapshots: the tab says
 * so up front, with a "Convert to qcow2" button per raw disk whose progress shows right there.
 *
 * Example (js/disks.js):
 *   renderSnapshots(panel, { id, name, state }, { convert: (diskId) => …, jobsStrip, refresh });
 */
import * as api from './api.js';
import { field, formatBinary, openSheet } from './sheet.js';
import { confirmAction, h, toast } from './ui.js';

const UP = new Set(['starting', 'running', 'paused', 'stopping']);
const NAME = /^(?![0-9]+$)[A-Za-z0-9][A-Za-z0-9._-]{0,62}$/;

const snapPath = (vm, rest = '') => `/api/vms/${encodeURIComponent(vm.id)}/snapshots${rest}`;

function formatDate(iso) {
  if (!iso) return '';
  const date = new Date(iso);
  if (Number.isNaN(date.getTime())) return iso;
  return date.toLocaleString(undefined, { year: 'numeric', month: 'short', day: 'numeric', hour: '2-digit', minute: '2-digit' });
}

/** A name to offer: "snap-2024-05-02-1430", unique among `taken`. */
function suggestName(taken) {
  const now = new Date();
  const pad = (n) => String(n).padStart(2, '0');
  const base = `snap-${now.getFullYear()}-${pad(now.getMonth() + 1)}-${pad(now.getDate())}-${pad(now.getHours())}${pad(now.getMinutes())}`;
  let name = base;
  for (let i = 2; taken.has(name); i += 1) name = `${base}-${i}`;
  return name;
}

export async function renderSnapshots(panel, vm, { convert, jobsStrip, refresh }) {
  const running = UP.has(vm.state);
  const body = h('div', { class: 'snapshot-body' }, h('p', { class: 'muted' }, 'Loading the snapshots…'));
  const take = h('button', { type: 'button', class: 'primary', id: 'snapshot-take', disabled: true }, '+ Take snapshot…');
  panel.replaceChildren(h('section', { class: 'storage', id: 'snapshots-panel' },
    h('div', { class: 'storage-head' },
      h('div', {},
        h('h2', {}, 'Snapshots'),
        h('p', { class: 'hint' }, running
          ? 'The VM is running: a snapshot taken now keeps its memory too, and reverting to it resumes right where it was.'
          : 'A snapshot keeps the disks (and UEFI and TPM state) as they are now; revert to come back to it.')),
      h('span', { class: 'spacer' }), take),
    jobsStrip(vm), body));
  let listing;
  try {
    listing = await api.request('GET', snapPath(vm));
  } catch (error) {
    body.replaceChildren(h('p', { class: 'form-error' }, error.message));
    return;
  }
  const taken = new Set(listing.snapshots.map((row) => row.name));
  take.disabled = Boolean(listing.unsupported);
  take.title = listing.unsupported ? listing.unsupported.message : '';
  take.addEventListener('click', () => takeDialog(vm, taken, refresh));
  const parts = [];
  if (listing.unsupported) {
    parts.push(h('div', { class: 'notice notice-warn', id: 'snapshot-unsupported', role: 'note' },
      h('p', {}, listing.unsupported.message, '. Converting rewrites the image; the VM must be stopped.'),
      h('div', { class: 'notice-buttons' }, listing.unsupported.disks.map((disk) =>
        h('button', { type: 'button', class: 'primary convert-qcow2', dataset: { disk }, disabled: running,
                      title: running ? 'Stop the VM to convert its disks' : '', onclick: () => convert(disk) },
          `Convert ${disk} to qcow2`)))));
  }
  if (!listing.tree.length) {
    parts.push(h('p', { class: 'panel-note', id: 'snapshot-empty' }, listing.unsupported
      ? 'No snapshots yet.'
      : 'No snapshots yet. Take one before an upgrade or an experiment, and come back to it if things go wrong.'));
  } else {
    parts.push(h('ul', { class: 'snap-tree', id: 'snapshot-tree', role: 'tree' },
                 listing.tree.map((node) => snapNode(vm, node, refresh))));
  }
  body.replaceChildren(...parts);
}

function snapNode(vm, node, refresh) {
  const running = UP.has(vm.state);
  const canRevert = node.available && (!running || node.live);
  const meta = [formatDate(node.created), node.live ? `memory ${formatBinary(node.size)}` : 'disks only'].filter(Boolean);
  return h('li', { class: 'snap-node', role: 'treeitem', dataset: { snapshot: node.name, current: String(node.current) } },
    h('div', { class: `snap-row${node.current ? ' current' : ''}` },
      h('span', { class: 'snap-dot', 'aria-hidden': 'true' }),
      h('div', { class: 'snap-text' },
        h('div', { class: 'snap-title' },
          h('span', { class: 'snap-name' }, node.name),
          node.live ? h('span', { class: 'badge live', title: 'Taken while running: holds the memory state' }, 'with memory') : null,
          node.current ? h('span', { class: 'badge current', title: 'The VM’s disks descend from this snapshot' }, 'you are here') : null,
          node.available ? null : h('span', { class: 'badge state-crashed', title: 'Kept in the metadata, but in no image the VM uses now' }, 'not available')),
        node.description ? h('div', { class: 'snap-description' }, node.description) : null,
        h('div', { class: 'snap-meta' }, meta.join(' · '))),
      h('span', { class: 'spacer' }),
      h('div', { class: 'snap-actions' },
        h('button', { type: 'button', class: 'snap-revert', disabled: !canRevert,
                      title: canRevert ? `Go back to ${node.name}` : running ? 'This snapshot has no memory state: stop the VM to revert to it' : 'Not available',
                      onclick: () => revert(vm, node, refresh) }, 'Revert…'),
        h('button', { type: 'button', class: 'snap-delete danger-outline', onclick: () => remove(vm, node, refresh) }, 'Delete…'))),
    node.children.length ? h('ul', { role: 'group' }, node.children.map((child) => snapNode(vm, child, refresh))) : null);
}

function takeDialog(vm, taken, refresh) {
  const running = UP.has(vm.state);
  const name = h('input', { type: 'text', id: 'snapshot-name', value: suggestName(taken), autocomplete: 'off', spellcheck: false });
  const description = h('input', { type: 'text', id: 'snapshot-description', maxlength: 1000, autocomplete: 'off',
                                   placeholder: 'what this moment is, e.g. “before the upgrade”' });
  openSheet({
    id: 'snapshot-dialog', title: `Take a snapshot of ${vm.name}`,
    intro: running ? 'The VM is running: its memory is saved too (it pauses for a moment while that is written).'
                   : 'The VM is stopped: the snapshot keeps its disks, UEFI variables and TPM state.',
    body: [field('name', 'Name', name, "Letters, digits, '.', '_' and '-'; not only digits."),
           field('description', 'Description (optional)', description)],
    submit: 'Take snapshot',
    onSubmit: async (sheet) => {
      if (!NAME.test(name.value)) {
        throw { field: 'name', message: "Use up to 63 letters, digits, '.', '_' and '-', starting with a letter or digit (not only digits)" };
      }
      sheet.ok.textContent = running ? 'Saving memory…' : 'Taking…';
      try {
        const row = await api.request('POST', snapPath(vm), { name: name.value, description: description.value });
        sheet.close();
        toast(`Snapshot ${row.name} taken (${row.live ? 'with memory' : 'disks only'})`, 'ok');
        refresh();
      } finally {
        sheet.ok.textContent = 'Take snapshot';
      }
    },
  });
}

async function revert(vm, node, refresh) {
  const running = UP.has(vm.state);
  const yes = await confirmAction({
    title: `Revert ${vm.name} to “${node.name}”?`,
    text: running
      ? 'The VM jumps back to that moment, memory included. Everything it did since is lost (unless a later snapshot keeps it).'
      : 'Its disks go back to that moment. Changes made since are lost (unless a later snapshot keeps them).',
    ok: 'Revert' });
  if (!yes) return;
  try {
    const result = await api.request('POST', snapPath(vm, `/${encodeURIComponent(node.name)}/revert`));
    toast(`${vm.name} is back at ${node.name}: ${result.note}`, 'ok');
  } catch (error) {
    toast(error.message, 'error');
  }
  refresh();
}

async function remove(vm, node, refresh) {
  const yes = await confirmAction({
    title: `Delete snapshot “${node.name}”?`,
    text: node.children.length
      ? 'Only this snapshot goes; the snapshots taken after it stay (they move up one level). The VM as it is now does not change.'
      : 'The VM as it is now does not change; you just cannot come back to this moment any more.',
    ok: 'Delete' });
  if (!yes) return;
  try {
    await api.request('DELETE', snapPath(vm, `/${encodeURIComponent(node.name)}`));
    toast(`Deleted snapshot ${node.name}`, 'ok');
  } catch (error) {
    toast(error.message, 'error');
  }
  refresh();
}
