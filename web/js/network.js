/**
 * Networks, USB, the guest agent and the shared folder in the page.
 *
 * - The Networks page (#/networks): the custom private networks (no admin rights needed: Thalunix runs a
 *   switch on 127.0.0.1), their VMs and switches; create and delete.
 * - A VM's Network tab: its cards (mode, model, MAC, what they connect to) with an editor for port forwards
 *   (TCP, UDP or both; 127.0.0.1 unless opened to the LAN on purpose) and for cards; the shared folder;
 *   the guest agent's facts (OS, IP addresses) with file copy in and out (progress from job.progress
 *   events); host USB devices to plug in or unplug while the VM runs.
 *
 * Example:
 *   import * as network from './network.js';
 *   network.showNetworks(main);
 *   network.renderNetworkTab(panel, vm, 'running', () => reloadVm());
 */

import { ApiError, request } from './api.js';
import { confirmAction, h, toast } from './ui.js';

const MODES = [['user', 'NAT (internet, port forwards)'], ['restricted', 'NAT without internet access'],
               ['private', 'Private network between VMs'], ['bridge', 'Bridged to a host adapter'], ['none', 'Not connected']];
const MODELS = ['virtio-net-pci', 'e1000e', 'e1000', 'rtl8139'];

// One HTTP helper for the whole UI: api.js's request (errors as ApiError with the API's field).
const call = request;

const vmPath = (id, rest = '') => `/api/vms/${encodeURIComponent(id)}${rest}`;
export const listNetworks = () => call('GET', '/api/networks');
export const createNetwork = (name, description) => call('POST', '/api/networks', { name, description });
export const deleteNetwork = (name) => call('DELETE', `/api/networks/${encodeURIComponent(name)}`);
export const listNics = (id) => call('GET', vmPath(id, '/nics'));
export const addNic = (id, nic) => call('POST', vmPath(id, '/nics'), nic);
export const removeNic = (id, card) => call('DELETE', vmPath(id, `/nics/${card}`));
export const addForward = (id, spec, card) => call('POST', vmPath(id, '/forwards'), { spec, card });
export const removeForward = (id, spec, card) =>
  call('DELETE', vmPath(id, `/forwards?spec=${encodeURIComponent(spec)}&card=${card}`));
export const hostUsb = () => call('GET', '/api/usb');
export const vmUsb = (id) => call('GET', vmPath(id, '/usb'));
export const attachUsb = (id, device, remember) => call('POST', vmPath(id, '/usb'), { device, remember });
export const detachUsb = (id, device) => call('DELETE', vmPath(id, `/usb/${encodeURIComponent(device)}`));
export const agentInfo = (id) => call('GET', vmPath(id, '/agent'));
export const copyIn = (id, hostFile, guestPath) => call('POST', vmPath(id, '/copy-in'), { host_file: hostFile, guest_path: guestPath });
export const copyOut = (id, guestPath, hostFile) => call('POST', vmPath(id, '/copy-out'), { guest_path: guestPath, host_file: hostFile });
export const getShare = (id) => call('GET', vmPath(id, '/share'));
export const setShare = (id, folder) => call('PUT', vmPath(id, '/share'), { folder });

function fail(error) {
  toast(error.message, 'error');
}

// -- the Networks page ----------------------------------------------------------------------------------
export async function showNetworks(main) {
  const body = h('tbody', {}, h('tr', {}, h('td', { colspan: 4 }, 'Loading…')));
  const name = h('input', { id: 'network-name', placeholder: 'lab', required: true,
                            'aria-label': 'Network name' });
  const description = h('input', { id: 'network-description', placeholder: 'what it is for', 'aria-label': 'Description' });
  const error = h('p', { class: 'field-error', id: 'network-error', role: 'alert' });
  const refresh = async () => {
    let rows;
    try { rows = await listNetworks(); } catch (e) { fail(e); return; }
    body.replaceChildren(...(rows.length ? rows.map((row) => h('tr', { dataset: { network: row.name } },
      h('td', {}, h('strong', {}, row.name), row.description ? h('div', { class: 'hint' }, row.description) : null),
      h('td', {}, row.vms?.length ? row.vms.join(', ') : '—'),
      h('td', {}, row.switch?.running ? `running (UDP ${row.switch.port} on 127.0.0.1)` : 'not running'),
      h('td', {}, h('button', { class: 'danger small', onclick: async () => {
        if (!await confirmAction({ title: `Delete network ${row.name}?`, text: 'VMs on it must be moved off first.', ok: 'Delete' })) return;
        try { await deleteNetwork(row.name); toast(`Deleted network ${row.name}`, 'ok'); } catch (e) { fail(e); }
        refresh();
      } }, 'Delete'))))
      : [h('tr', {}, h('td', { colspan: 4 }, 'No custom networks yet.'))]));
  };
  const form = h('form', { class: 'net-form', onsubmit: async (event) => {
    event.preventDefault();
    error.textContent = '';
    try {
      await createNetwork(name.value.trim(), description.value.trim());
      toast(`Created network ${name.value.trim()}`, 'ok');
      name.value = ''; description.value = '';
    } catch (e) {
      error.textContent = e.message;
    }
    refresh();
  } }, h('label', {}, 'Name ', name), h('label', {}, 'Description ', description),
  h('button', { class: 'primary', type: 'submit', id: 'network-create' }, 'Create network'), error);
  main.replaceChildren(h('section', { class: 'net-page' },
    h('h1', {}, 'Custom networks'),
    h('p', { class: 'hint' }, 'VMs whose network card is on the same private network see each other and nothing else. ' +
      'No administrator rights are needed: Thalunix runs a small switch on 127.0.0.1 while one of its VMs runs.'),
    form,
    h('table', { class: 'details net-table' }, h('thead', {}, h('tr', {}, h('th', {}, 'Network'), h('th', {}, 'VMs'),
      h('th', {}, 'Switch'), h('th', {}, ''))), body)));
  refresh();
}

// -- a VM's Network tab ---------------------------------------------------------------------------------
/**
 * Draw the Network tab of `vm` (GET /api/vms/{id}) in `panel`; `vmState` decides what can be changed
 * (cards and the shared folder while stopped, USB and the agent while running); `changed()` reloads the VM.
 */
export async function renderNetworkTab(panel, vm, vmState, changed) {
  const stopped = vmState === 'stopped' || vmState === 'crashed';
  const running = vmState === 'running';
  let nics = [];
  let networks = [];
  try {
    [nics, networks] = await Promise.all([listNics(vm.id), listNetworks()]);
  } catch (e) { fail(e); }
  const sections = [cardsSection(vm, nics, networks, stopped, changed), shareSection(vm, stopped, changed),
                    agentSection(vm, running), usbSection(vm, running)];
  panel.replaceChildren(h('div', { class: 'net-tab' }, ...sections));
}

function cardsSection(vm, nics, networks, stopped, changed) {
  const rows = nics.map((nic) => h('tr', { dataset: { card: nic.card } },
    h('td', {}, String(nic.card)),
    h('td', {}, (MODES.find(([m]) => m === nic.mode) || [nic.mode, nic.mode])[1]),
    h('td', {}, nic.target || '—'),
    h('td', {}, h('code', {}, nic.mac), ' · ', nic.model),
    h('td', {}, forwardEditor(vm, nic, stopped, changed)),
    h('td', {}, h('button', { class: 'small', disabled: !stopped, title: stopped ? '' : 'Stop the VM to change its cards',
      onclick: async () => {
        try { await removeNic(vm.id, nic.card); toast(`Removed card ${nic.card}`, 'ok'); changed(); } catch (e) { fail(e); }
      } }, 'Remove'))));
  const mode = h('select', { id: 'nic-mode', 'aria-label': 'Mode' }, MODES.map(([value, label]) => h('option', { value }, label)));
  const network = h('select', { id: 'nic-network', 'aria-label': 'Private network' },
    networks.length ? networks.map((n) => h('option', { value: n.name }, n.name)) : h('option', { value: '' }, '(create one on the Networks page)'));
  const bridge = h('input', { id: 'nic-bridge', placeholder: 'br0 / TAP adapter name', 'aria-label': 'Bridge' });
  const model = h('select', { id: 'nic-model', 'aria-label': 'Card model' }, MODELS.map((m) => h('option', { value: m }, m)));
  const sync = () => {
    network.closest('label').hidden = mode.value !== 'private';
    bridge.closest('label').hidden = mode.value !== 'bridge';
  };
  mode.addEventListener('change', sync);
  const add = h('form', { class: 'net-form', onsubmit: async (event) => {
    event.preventDefault();
    const nic = { mode: mode.value, model: model.value };
    if (mode.value === 'private') nic.network = network.value;
    if (mode.value === 'bridge') nic.bridge = bridge.value.trim();
    try { await addNic(vm.id, nic); toast('Added a network card', 'ok'); changed(); } catch (e) { fail(e); }
  } }, h('label', {}, 'Mode ', mode), h('label', {}, 'Network ', network), h('label', {}, 'Bridge ', bridge),
  h('label', {}, 'Model ', model),
  h('button', { type: 'submit', id: 'nic-add', disabled: !stopped }, 'Add card'));
  setTimeout(sync);
  return h('section', { class: 'net-section', id: 'net-cards' }, h('h2', {}, 'Network cards'),
    h('table', { class: 'details net-table' }, h('thead', {}, h('tr', {}, h('th', {}, '#'), h('th', {}, 'Mode'),
      h('th', {}, 'Connects to'), h('th', {}, 'MAC · model'), h('th', {}, 'Port forwards'), h('th', {}, ''))),
    h('tbody', {}, rows.length ? rows : h('tr', {}, h('td', { colspan: 6 }, 'No network cards.')))),
    stopped ? add : h('p', { class: 'hint' }, 'Stop the VM to change its cards and forwards.'));
}

function forwardEditor(vm, nic, stopped, changed) {
  if (!['user', 'restricted'].includes(nic.mode)) return '—';
  const items = nic.forwards.map((spec) => {
    const [protocol, address, hostPort, guestPort] = spec.split(':');
    const lan = address !== '127.0.0.1';
    return h('li', { dataset: { forward: spec } }, `${protocol.toUpperCase()} ${address}:${hostPort} → guest ${guestPort}`,
      lan ? h('span', { class: 'warn' }, ' (open to the LAN)') : null, ' ',
      h('button', { class: 'small link', disabled: !stopped, 'aria-label': `Remove forward ${spec}`, onclick: async () => {
        try { await removeForward(vm.id, `${protocol}:${hostPort}`, nic.card); changed(); } catch (e) { fail(e); }
      } }, '×'));
  });
  const protocol = h('select', { class: 'fwd-protocol', 'aria-label': 'Protocol' },
    ['tcp', 'udp', 'both'].map((p) => h('option', { value: p }, p === 'both' ? 'TCP+UDP' : p.toUpperCase())));
  const hostPort = h('input', { class: 'fwd-host', type: 'number', min: 1, max: 65535, placeholder: 'host', 'aria-label': 'Host port', size: 6 });
  const guestPort = h('input', { class: 'fwd-guest', type: 'number', min: 1, max: 65535, placeholder: 'guest', 'aria-label': 'Guest port', size: 6 });
  const lan = h('input', { class: 'fwd-lan', type: 'checkbox', 'aria-label': 'Open to the LAN' });
  const form = h('form', { class: 'fwd-form', onsubmit: async (event) => {
    event.preventDefault();
    if (lan.checked && !await confirmAction({ title: 'Open this port to your network?',
      text: `Other computers on your network will reach guest port ${guestPort.value} through host port ${hostPort.value}.`,
      ok: 'Open it' })) return;
    const address = lan.checked ? '0.0.0.0' : '127.0.0.1';
    const protocols = protocol.value === 'both' ? ['tcp', 'udp'] : [protocol.value];
    try {
      for (const p of protocols) await addForward(vm.id, `${p}:${address}:${hostPort.value}:${guestPort.value}`, nic.card);
      changed();
    } catch (e) { fail(e); changed(); }
  } }, protocol, hostPort, '→', guestPort, h('label', { class: 'fwd-lan-label' }, lan, ' LAN'),
  h('button', { type: 'submit', class: 'small', disabled: !stopped }, 'Add'));
  return h('div', {}, h('ul', { class: 'fwd-list' }, items), stopped ? form : null);
}

function shareSection(vm, stopped, changed) {
  const folder = h('input', { id: 'share-folder', value: vm.shared_folder || '', placeholder: '/home/me/shared',
                              'aria-label': 'Shared folder', size: 40 });
  const form = h('form', { class: 'net-form', onsubmit: async (event) => {
    event.preventDefault();
    try {
      const info = await setShare(vm.id, folder.value.trim() || null);
      toast(info.folder ? `Sharing ${info.folder} at ${info.guest_url}` : 'Stopped sharing', 'ok');
      changed();
    } catch (e) { fail(e); }
  } }, folder, h('button', { type: 'submit', id: 'share-set', disabled: !stopped }, folder.value ? 'Change' : 'Share'),
  vm.shared_folder ? h('button', { type: 'button', disabled: !stopped, onclick: () => { folder.value = ''; form.requestSubmit(); } }, 'Stop sharing') : null);
  return h('section', { class: 'net-section', id: 'net-share' }, h('h2', {}, 'Shared folder'),
    h('p', { class: 'hint' }, 'Only this VM reaches it, as WebDAV at ', h('code', {}, 'http://10.0.2.100/'),
      ' (through its first NAT card). Windows: map a network drive to that address; Linux: davfs2 or wget.'),
    form);
}

function agentSection(vm, running) {
  const facts = h('div', { id: 'agent-facts', class: 'hint' }, running ? 'Asking the guest agent…' : 'Start the VM to ask its guest agent.');
  const load = async () => {
    if (!running) return;
    try {
      const info = await agentInfo(vm.id);
      const os = info.os?.['pretty-name'] || info.os?.name || 'unknown';
      facts.replaceChildren(h('div', {}, h('strong', {}, 'OS: '), os),
        h('div', {}, h('strong', {}, 'Host name: '), info.hostname || '?'),
        h('div', { id: 'agent-ips' }, h('strong', {}, 'IP addresses: '), info.ips.length ? info.ips.join(', ') : 'none yet'));
    } catch (e) {
      facts.textContent = e.message;
    }
  };
  const hostFile = h('input', { id: 'copy-host', placeholder: 'host file', 'aria-label': 'Host file', size: 28 });
  const guestPath = h('input', { id: 'copy-guest', placeholder: 'guest path, e.g. /tmp/file', 'aria-label': 'Guest path', size: 28 });
  const progress = h('progress', { id: 'copy-progress', max: 100, value: 0, hidden: true });
  const result = h('div', { id: 'copy-result', class: 'hint' });
  const copy = (direction) => async () => {
    result.textContent = '';
    try {
      const job = direction === 'in' ? await copyIn(vm.id, hostFile.value.trim(), guestPath.value.trim())
                                     : await copyOut(vm.id, guestPath.value.trim(), hostFile.value.trim());
      follow(job.id, progress, result);
    } catch (e) { fail(e); }
  };
  setTimeout(load);
  return h('section', { class: 'net-section', id: 'net-agent' }, h('h2', {}, 'Guest agent'), facts,
    h('button', { class: 'small', onclick: load, disabled: !running }, 'Ask again'),
    h('div', { class: 'net-form' }, hostFile, guestPath,
      h('button', { type: 'button', id: 'copy-in', disabled: !running, onclick: copy('in') }, 'Copy into the guest'),
      h('button', { type: 'button', id: 'copy-out', disabled: !running, onclick: copy('out') }, 'Copy out of the guest')),
    progress, result);
}

/** Show a copy job's progress from the event stream (job.progress), its result or error at the end. */
function follow(jobId, progress, result) {
  progress.hidden = false;
  progress.value = 0;
  const source = new EventSource('/api/events');
  source.addEventListener('job.progress', (event) => {
    let data = {};
    try { data = JSON.parse(event.data); } catch (e) { return; }
    if (data.job !== jobId) return;
    progress.value = data.percent || 0;
    if (['done', 'failed', 'cancelled'].includes(data.state)) {
      source.close();
      progress.hidden = true;
      fetch(`/api/jobs/${encodeURIComponent(jobId)}`, { credentials: 'same-origin' }).then((r) => r.json()).then((job) => {
        if (job.state === 'done') {
          const r = job.result;
          result.textContent = `Copied ${r.bytes} bytes in ${r.seconds} s · SHA-256 ${r.sha256}` +
            (r.verified ? ' (same in the guest)' : ' (not checked in the guest)');
        } else {
          result.textContent = job.error || data.error || 'The copy failed';
        }
      }).catch(() => { result.textContent = data.error || data.state; });
    }
  });
}

function usbSection(vm, running) {
  const list = h('ul', { id: 'usb-list', class: 'usb-list' }, h('li', {}, 'Looking for USB devices…'));
  const remember = h('input', { type: 'checkbox', id: 'usb-remember' });
  const refresh = async () => {
    let host = [];
    let attached = [];
    try {
      host = await hostUsb();
      attached = running ? await vmUsb(vm.id) : [];
    } catch (e) { fail(e); }
    const plugged = new Set(attached.map((row) => row.qemu_id).filter(Boolean));
    const remembered = new Set(vm.usb_devices || []);
    const entries = [...host.map((d) => ({ id: d.id, label: `${d.manufacturer} ${d.product}`.trim() })),
                     { id: 'usb-kbd', label: 'Emulated USB keyboard' }, { id: 'usb-mouse', label: 'Emulated USB mouse' }];
    list.replaceChildren(...entries.map((device) => {
      const qid = device.id.includes(':') ? `usb-${device.id.replace(':', '-')}` : device.id;
      const on = plugged.has(qid);
      return h('li', { dataset: { usb: device.id } }, h('code', {}, device.id), ' ', device.label,
        remembered.has(device.id) ? h('span', { class: 'hint' }, ' (plugged in at start)') : null, ' ',
        h('button', { class: 'small', disabled: !running, onclick: async () => {
          try {
            if (on) await detachUsb(vm.id, device.id);
            else await attachUsb(vm.id, device.id, remember.checked);
            toast(on ? `Unplugged ${device.id}` : `Plugged in ${device.id}`, 'ok');
          } catch (e) { fail(e); }
          refresh();
        } }, on ? 'Unplug' : 'Plug in'));
    }));
    if (!host.length) list.prepend(h('li', { class: 'hint' }, 'No USB devices found on this host.'));
  };
  setTimeout(refresh);
  return h('section', { class: 'net-section', id: 'net-usb' }, h('h2', {}, 'USB devices'),
    running ? null : h('p', { class: 'hint' }, 'Start the VM to plug devices in.'),
    h('label', {}, remember, ' Plug in again at every start'), list);
}
