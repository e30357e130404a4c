/**
 * The Thalunix page: the VM list, the selected VM (screen, console, logs, details), the form.
 *
 * State comes from the API's event stream (`vm.state`, `vm.serial`, `vm.log`, `vm.config`): the
 * list is read once per (re)connection of the stream and then kept up to date by its events —
 * nothing polls for state. Thumbnails of running VMs are refreshed when their state changes and,
 * while the page is visible, every THUMBNAIL_SECONDS.
 *
 * Routes (location.hash): #/  ·  #/new  ·  #/vm/ID/screen|console|logs|details  ·  #/vm/ID/edit
 *
 * Example: served by the local API at / (see thalunix/api/app.py); open the link `thalunix serve` prints.
 */
import * as api from './api.js';
import { renderVmForm } from './form.js';
import * as downloads from './downloads.js';
import { LogPanel } from './logs.js';
import { VncScreen } from './screen.js';
import { SerialTerminal } from './terminal.js';
import { icon } from './icons.js';
import { initTheme } from './theme.js';
import * as hosts from './hosts.js';
import * as network from './network.js';
import * as storage from './disks.js';
import { confirmAction, formatRam, h, pathFromFileUrl, toast } from './ui.js';

const THUMBNAIL_SECONDS = 5;
const TABS = [['screen', 'Screen'], ['console', 'Console'], ['logs', 'Logs'], ['details', 'Details'],
              ['network', 'Network'], ['disks', 'Disks'], ['snapshots', 'Snapshots']];
const STATE_LABELS = { stopped: 'Stopped', starting: 'Starting…', running: 'Running', paused: 'Paused',
                       stopping: 'Stopping…', crashed: 'Crashed', broken: 'Broken' };
const UP = new Set(['starting', 'running', 'paused', 'stopping']);
const SCREEN_STATES = new Set(['running', 'paused']);

/** Which actions make sense in which state; every other button is disabled. */
const ALLOWED = {
  start: new Set(['stopped', 'crashed']),
  pause: new Set(['running']),
  resume: new Set(['paused']),
  stop: new Set(['running']),
  force: new Set(['starting', 'running', 'paused', 'stopping']),
  reset: new Set(['running']),
  edit: new Set(['stopped', 'crashed']),
  delete: new Set(['stopped', 'crashed']),
  clone: new Set(['stopped', 'crashed']),
  export: new Set(['stopped', 'crashed']),
};

const vms = new Map();          // id → summary row of GET /api/vms
const thumbs = new Map();       // id → { url, busy, failed }
let loaded = false;
let current = null;             // the open VM view: { id, detail, tab, terminal, screen, logs, … }
let openForm = null;            // the create/edit form on screen, for dropped files
let pendingPath = null;         // a dropped file waiting for the create form
let pendingPreset = null;       // an ISO and its catalog defaults waiting for the create form (ISOs page)
let editingId = null;           // the VM whose settings form is open, marked in the list

const main = document.getElementById('main');
const list = document.getElementById('vm-list');

// -- the list -------------------------------------------------------------------------------------------
async function loadList() {
  try {
    const rows = await api.listVms();
    const seen = new Set();
    for (const row of rows) {
      seen.add(row.id);
      const before = vms.get(row.id);
      vms.set(row.id, row);
      if (before && before.state !== row.state) stateChanged(row.id, row.state, before.state);
    }
    for (const id of [...vms.keys()]) if (!seen.has(id)) { vms.delete(id); thumbs.delete(id); }
    loaded = true;
  } catch (error) {
    toast(error.message, 'error');
  }
  renderList();
  route();
}

function vmLabel(vm) {
  return vm.name || `(unreadable ${vm.id.slice(0, 8)})`;
}

function specs(vm) {
  if (vm.state === 'broken') return vm.error || 'Its settings file cannot be read';
  const cpu = vm.cpus === 1 ? '1 vCPU' : `${vm.cpus} vCPUs`;
  return [cpu, formatRam(vm.ram_mib), vm.os].filter(Boolean).join(' · ');
}

function badge(state) {
  return h('span', { class: `badge state-${state}`, dataset: { state } }, STATE_LABELS[state] || state);
}

function renderList() {
  const rows = [...vms.values()].sort((a, b) => vmLabel(a).localeCompare(vmLabel(b)));
  if (!rows.length) {
    list.replaceChildren(h('li', { class: 'list-empty' }, loaded ? 'No VMs yet' : 'Loading…'));
    return;
  }
  const selectedId = current?.id || editingId;
  list.replaceChildren(...rows.map((vm) => {
    const thumb = thumbs.get(vm.id);
    const picture = thumb?.url && SCREEN_STATES.has(vm.state)
      ? h('img', { class: 'thumb', src: thumb.url, alt: `Screen of ${vmLabel(vm)}` })
      : h('div', { class: `thumb placeholder state-${vm.state}`, 'aria-hidden': 'true' },
          UP.has(vm.state) ? '' : icon('screen', 26));
    return h('li', {},
      h('a', { class: `vm-entry${selectedId === vm.id ? ' selected' : ''}`, href: `#/vm/${vm.id}/${current?.id === vm.id ? current.tab : defaultTab(vm)}`,
               dataset: { id: vm.id, name: vm.name || '' }, 'aria-current': selectedId === vm.id ? 'page' : false },
        picture,
        h('span', { class: 'entry-text' },
          h('span', { class: 'entry-name' }, vmLabel(vm)),
          h('span', { class: 'entry-specs' }, specs(vm)),
          badge(vm.state))));
  }));
}

function defaultTab(vm) {
  return UP.has(vm.state) ? 'screen' : 'details';
}

// -- thumbnails ----------------------------------------------------------------------------------------
function refreshThumb(id) {
  const vm = vms.get(id);
  if (!vm || !SCREEN_STATES.has(vm.state)) return;
  const thumb = thumbs.get(id) || {};
  thumbs.set(id, thumb);
  if (thumb.busy || thumb.failed) return;
  thumb.busy = true;
  // Loaded off-screen first, so the old picture stays until the new one is complete.
  const image = new Image();
  const url = api.screenshotUrl(id);
  image.onload = () => { thumb.busy = false; thumb.url = url; updateThumb(id); };
  image.onerror = () => { thumb.busy = false; thumb.failed = true; };
  image.src = url;
}

function updateThumb(id) {
  const entry = list.querySelector(`.vm-entry[data-id="${id}"]`);
  const thumb = thumbs.get(id);
  if (!entry || !thumb?.url) return;
  const old = entry.querySelector('.thumb');
  if (old.tagName === 'IMG') old.src = thumb.url;
  else old.replaceWith(h('img', { class: 'thumb', src: thumb.url, alt: `Screen of ${vmLabel(vms.get(id))}` }));
}

setInterval(() => {
  if (document.visibilityState !== 'visible') return;
  for (const vm of vms.values()) if (vm.state === 'running') refreshThumb(vm.id);
}, THUMBNAIL_SECONDS * 1000);
document.addEventListener('visibilitychange', () => {
  if (document.visibilityState === 'visible') for (const vm of vms.values()) refreshThumb(vm.id);
});

// -- events ----------------------------------------------------------------------------------------------
function stateChanged(id, state, before) {
  const thumb = thumbs.get(id);
  if (thumb) thumb.failed = false;
  if (SCREEN_STATES.has(state)) setTimeout(() => refreshThumb(id), 1500);
  else thumbs.delete(id);
  if (current?.id === id) currentStateChanged(state, before);
}

const connection = document.getElementById('connection');
function setConnection(state, text) {
  connection.dataset.state = state;
  connection.textContent = text;
}

api.events({
  ready: () => { setConnection('live', 'Live'); loadList(); downloads.onReconnect(); storage.onReconnect(); },
  'job.progress': (event) => { downloads.onProgress(event); storage.onProgress(event); },
  down: () => setConnection('down', 'Reconnecting…'),
  'vm.state': (event) => {
    if (event.host) { hosts.onEvent(event); return; }   // a libvirt host's VM: the hosts panel shows it
    const vm = vms.get(event.vm);
    if (!vm) { loadList(); return; }
    const before = vm.state;
    vm.state = event.state;
    renderList();
    if (before !== event.state) stateChanged(event.vm, event.state, before);
  },
  'vm.config': (event) => { if (event.host) hosts.onEvent(event); else loadList(); },
  'vm.serial': (event) => {
    if (current?.id !== event.vm) return;
    current.terminal?.feed(event.data);
    current.logs?.onSerial(event.data);
  },
  'vm.log': (event) => {
    if (current?.id === event.vm) current.logs?.onLogLine(event.line);
  },
});

// -- routing ---------------------------------------------------------------------------------------------
let routed = null;              // the hash whose view is on screen

function go(hash) {
  if (location.hash === hash) route(true);
  else location.hash = hash;
}

/** Whether the view drawn for `hash` still fits the list (its VM still exists, the empty state is still empty). */
function stillValid(hash) {
  const [, page, id] = hash.split('/');
  if (page === 'new' || page === 'downloads' || page === 'networks') return true;
  if (page === 'vm') return vms.has(id);
  return vms.size === 0;
}

/** Draw the view of location.hash; a list refresh redraws only when the view no longer fits. */
function route(force = false) {
  if (!loaded) return;
  const hash = location.hash || '#/';
  if (!force && hash === routed && stillValid(hash)) return;
  routed = hash;
  const [, page, id, tab] = hash.split('/');
  downloads.hideDownloads();
  if (page === 'downloads') document.getElementById('nav-downloads')?.setAttribute('aria-current', 'page');
  else document.getElementById('nav-downloads')?.removeAttribute('aria-current');
  if (page === 'downloads') { closeVm(); openForm = null; downloads.showDownloads(main); return; }
  if (page === 'networks') { closeVm(); openForm = null; network.showNetworks(main); return; }
  if (page === 'new') { closeVm(); showForm(null); return; }
  if (page === 'vm' && vms.has(id)) {
    if (tab === 'edit') { showEdit(id); return; }
    openVm(id, TABS.some(([name]) => name === tab) ? tab : defaultTab(vms.get(id)));
    return;
  }
  closeVm();
  const first = [...vms.values()].sort((a, b) => vmLabel(a).localeCompare(vmLabel(b)))[0];
  if (first) { go(`#/vm/${first.id}/${defaultTab(first)}`); return; }
  showEmpty();
}
window.addEventListener('hashchange', () => route(true));

function showEmpty() {
  openForm = null;
  main.replaceChildren(h('section', { class: 'empty-state' },
    h('div', { class: 'empty-art', 'aria-hidden': 'true' }),
    h('h1', {}, 'No VMs yet — create one'),
    h('p', {}, 'A virtual machine is a computer inside this one. Pick an installer ISO of the system you want ' +
               '(Debian, Ubuntu, Windows…), choose its memory and disk size, and start it.'),
    h('button', { class: 'primary big', id: 'empty-create', onclick: () => go('#/new') }, 'Create a VM'),
    h('p', { class: 'hint' }, 'Tip: drop an ISO file onto this window to start with it.')));
}

function showForm(vm) {
  editingId = vm?.id || null;
  renderList();
  const preset = vm ? null : pendingPreset;
  const initialPath = preset ? preset.iso : pendingPath;
  pendingPath = null;
  pendingPreset = null;
  const back = () => { openForm = null; go(vm ? `#/vm/${vm.id}/details` : preset ? '#/downloads' : '#/'); };
  openForm = renderVmForm(main, {
    vm, initialPath, onCancel: back,
    onDone: (saved) => {
      openForm = null;
      vms.set(saved.id, { ...(vms.get(saved.id) || {}), id: saved.id, name: saved.name, state: saved.state,
                          os: saved.os, cpus: saved.cpus, ram_mib: saved.ram_mib, firmware: saved.firmware });
      if (current?.id === saved.id) current.detail = saved;
      renderList();
      toast(vm ? `Saved the settings of ${saved.name}` : `Created ${saved.name}`, 'ok');
      go(`#/vm/${saved.id}/details`);
    },
  });
  if (preset) downloads.applyPreset(openForm.element, preset);
  if (!vm) downloads.followIsoDefaults(openForm.element);
}

async function showEdit(id) {
  closeVm();
  try {
    const detail = await api.getVm(id);
    if (!ALLOWED.edit.has(detail.state)) {
      toast(`${detail.name} is ${detail.state}; stop it before changing its settings`, 'error');
      go(`#/vm/${id}/details`);
      return;
    }
    showForm(detail);
  } catch (error) {
    toast(error.message, 'error');
  }
}

// -- one VM ----------------------------------------------------------------------------------------------
function closeVm() {
  editingId = null;
  if (!current) return;
  current.terminal?.dispose();
  current.screen?.disconnect();
  current = null;
  storage.onVmState(null);
  renderList();
}

async function openVm(id, tab) {
  openForm = null;
  if (current?.id !== id) {
    closeVm();
    current = { id, tab, detail: null, panels: {} };
    renderList();
    buildVmView();
    try {
      current.detail = await api.getVm(id);
    } catch (error) {
      toast(error.message, 'error');
    }
    if (current?.id !== id) return;
    renderHeader();
    renderDetails();
    renderNetwork();
  }
  selectTab(tab);
}

function buildVmView() {
  const tabs = h('div', { class: 'tabs', role: 'tablist' }, TABS.map(([name, label]) =>
    h('a', { role: 'tab', class: 'tab', href: `#/vm/${current.id}/${name}`, id: `tab-${name}`, dataset: { tab: name } }, label)));
  const panels = {};
  for (const [name] of TABS) {
    panels[name] = h('section', { class: `panel panel-${name}`, role: 'tabpanel', id: `panel-${name}`, hidden: true });
  }
  current.header = h('div', { class: 'vm-header' });
  current.panels = panels;
  main.replaceChildren(h('div', { class: 'vm-view' }, current.header, tabs, h('div', { class: 'panels' }, Object.values(panels))));
  renderHeader();
}

function selectTab(tab) {
  current.tab = tab;
  for (const [name, panel] of Object.entries(current.panels)) panel.hidden = name !== tab;
  for (const link of main.querySelectorAll('.tab')) {
    link.classList.toggle('active', link.dataset.tab === tab);
    link.setAttribute('aria-selected', link.dataset.tab === tab ? 'true' : 'false');
  }
  renderList();
  if (tab === 'console') openConsole();
  if (tab === 'screen') renderScreen();
  if (tab === 'logs') openLogs();
  if (tab === 'details') renderDetails();
  if (tab === 'network') renderNetwork();
  if (tab === 'disks' || tab === 'snapshots') storage.renderPanel(tab, current.panels[tab], storageVm());
}

/** The open VM as the Disks and Snapshots tabs (web/js/disks.js) need it. */
function storageVm() {
  return { id: current.id, name: vmLabel(vms.get(current.id) || current.detail || { id: current.id }), state: state() };
}

/** The Network tab (web/js/network.js); redrawn after its own changes and on state changes. */
function renderNetwork() {
  if (!current || current.tab !== 'network' || !current.detail) return;
  const id = current.id;
  network.renderNetworkTab(current.panels.network, current.detail, state(), async () => {
    try { const detail = await api.getVm(id); if (current?.id === id) { current.detail = detail; renderNetwork(); } }
    catch (error) { toast(error.message, 'error'); }
  });
}

function state() {
  return vms.get(current.id)?.state || current.detail?.state || 'stopped';
}

function renderHeader() {
  if (!current) return;
  const vm = vms.get(current.id) || current.detail || { id: current.id, state: 'stopped' };
  const now = vm.state;
  const button = (verb, label, handler, extra = {}) => h('button', {
    // While an action runs only Force stop stays usable: a shutdown the guest ignores must not trap the user.
    type: 'button', id: `action-${verb}`, disabled: !ALLOWED[verb].has(now) || (current.busy && verb !== 'force'),
    onclick: handler, ...extra,
  }, label);
  current.header.replaceChildren(
    h('div', { class: 'vm-title' },
      h('h1', {}, vmLabel(vm)), badge(now),
      h('span', { class: 'entry-specs' }, specs(vm))),
    h('div', { class: 'actions', role: 'toolbar', 'aria-label': 'VM actions' },
      button('start', [icon('play'), 'Start'], () => run('start'), { class: 'primary' }),
      button('pause', [icon('pause'), 'Pause'], () => run('pause')),
      button('resume', [icon('resume'), 'Resume'], () => run('resume')),
      button('stop', [icon('power'), 'Shut down'], () => run('stop'),
             { title: 'Press the power button: the guest shuts down cleanly' }),
      button('force', [icon('stop'), 'Force stop'], forceStop, { title: 'Pull the plug: unsaved data in the guest is lost' }),
      button('reset', [icon('reset'), 'Reset'], () => run('reset'), { title: 'Hard reset, like the reset button of a PC' }),
      h('span', { class: 'spacer' }),
      button('clone', 'Clone…', () => storage.openClone(storageVm()), { title: 'Make a copy of this VM (it must be stopped)' }),
      button('export', 'Export…', () => storage.openExport(storageVm()), { title: 'Write this VM to one .7z file (it must be stopped)' }),
      button('edit', [icon('gear'), 'Settings'], () => go(`#/vm/${current.id}/edit`),
             { title: now === 'stopped' || now === 'crashed' ? 'Change this VM' : 'Stop the VM to change its settings' }),
      button('delete', [icon('trash'), 'Delete'], deleteVm, { class: 'danger-outline' })),
    ...(current.error ? [h('p', { class: 'action-error', role: 'alert' }, current.error)] : []));
}

async function run(verb, body) {
  const id = current.id;
  const view = current;
  view.busy = true;
  view.error = null;
  renderHeader();
  try {
    const status = await api.action(id, verb, body);
    const vm = vms.get(id);
    if (vm && status?.state && vm.state !== status.state) {
      const before = vm.state;
      vm.state = status.state;
      renderList();
      stateChanged(id, status.state, before);
    }
  } catch (error) {
    view.error = error.message;
    toast(error.message, 'error');
  } finally {
    view.busy = false;
    if (current === view) renderHeader();
  }
}

async function forceStop() {
  const vm = vms.get(current.id);
  const yes = await confirmAction({
    title: `Force stop ${vmLabel(vm)}?`,
    text: 'This pulls the plug: the guest gets no chance to save its work, and its disk may need a check ' +
          'at the next start. Use “Shut down” for a clean stop.',
    ok: 'Force stop',
  });
  if (yes) run('stop', { force: true });
}

async function deleteVm() {
  const vm = vms.get(current.id);
  const answer = await confirmAction({
    title: `Delete ${vmLabel(vm)}?`,
    text: 'The VM and its disks are deleted for good. This cannot be undone.',
    ok: 'Delete',
    checkbox: 'Keep its disk images (moved to the disks-kept folder)',
  });
  if (!answer) return;
  const id = current.id;
  try {
    await api.deleteVm(id, answer.checked);
    toast(`Deleted ${vmLabel(vm)}`, 'ok');
    closeVm();
    vms.delete(id);
    thumbs.delete(id);
    renderList();
    go('#/');
  } catch (error) {
    current.error = error.message;
    renderHeader();
    toast(error.message, 'error');
  }
}

function currentStateChanged(now, before) {
  renderHeader();
  if (SCREEN_STATES.has(now) && !SCREEN_STATES.has(before)) {
    api.getVm(current.id).then((detail) => { if (current) { current.detail = detail; renderScreen(); renderDetails(); } });
  }
  if (!UP.has(now)) {
    current.screen?.disconnect();
    current.screen = null;
    if (current.terminal && UP.has(before)) current.terminal.note(`the VM is ${now}`);
    if (current.detail) current.detail.state = now;
    renderScreen();
    renderDetails();
  }
  if ((UP.has(now) !== UP.has(before)) || now === 'running') renderNetwork();
  storage.onVmState(storageVm());
  if (now === 'starting' && current.terminal) current.terminal.note('the VM is starting');
  current.logs?.onState();
}

// -- panels ----------------------------------------------------------------------------------------------
function renderScreen() {
  if (!current || current.tab !== 'screen') {
    // The screen keeps its connection only while it is shown.
    if (current?.screen) { current.screen.disconnect(); current.screen = null; }
    return;
  }
  const panel = current.panels.screen;
  const now = state();
  const kind = current.detail?.display?.kind;
  if (SCREEN_STATES.has(now) && kind === 'vnc') {
    if (current.screen) return;
    const status = h('span', { class: 'screen-status', id: 'screen-status' }, 'Connecting…');
    const target = h('div', { class: 'screen', id: 'screen' });
    panel.replaceChildren(
      h('div', { class: 'screen-toolbar' }, status, h('span', { class: 'spacer' }),
        h('button', { type: 'button', id: 'send-cad', onclick: () => current?.screen?.sendCtrlAltDel() }, 'Send Ctrl+Alt+Del')),
      target);
    current.screen = new VncScreen(target, current.id, (code, text) => {
      status.textContent = text;
      status.dataset.state = code;
    });
    current.screen.connect();
    return;
  }
  current.screen?.disconnect();
  current.screen = null;
  let message;
  const stopped = ALLOWED.edit.has(now);
  const switchTo = (target, label) => h('button', { type: 'button', id: `display-${target}`, onclick: () => setDisplay(target) }, label);
  if (kind === 'native') {
    message = [h('h2', {}, "This VM uses QEMU's own window"),
               h('p', {}, UP.has(now) ? 'Its screen is in a separate window on this computer.'
                                      : 'When it starts, its screen opens in a separate window on this computer.'),
               stopped ? switchTo('vnc', 'Show the screen here instead')
                       : h('p', { class: 'hint' }, 'To see the screen here instead, stop the VM first.')];
  } else if (kind === 'none') {
    message = [h('h2', {}, 'This VM has no screen'), h('p', {}, 'Use the Console tab to talk to it over its serial line.')];
  } else if (now === 'starting') {
    message = [h('h2', {}, 'Starting…'), h('p', {}, 'The screen appears once QEMU is up.')];
  } else {
    message = [h('h2', {}, `${vmLabel(vms.get(current.id) || {})} is ${STATE_LABELS[now]?.toLowerCase() || now}`),
               h('p', {}, 'Start it to see its screen here.'),
               h('div', { class: 'panel-buttons' },
                 ALLOWED.start.has(now) ? h('button', { class: 'primary', type: 'button', onclick: () => run('start') }, icon('play'), 'Start') : null,
                 stopped && kind === 'vnc' ? switchTo('native', "Use QEMU's own window instead") : null)];
  }
  panel.replaceChildren(h('div', { class: 'panel-empty' }, message));
}

/** Switch a stopped VM between the embedded screen and QEMU's own window. */
async function setDisplay(kind) {
  const view = current;
  try {
    view.detail = await api.editVm(view.id, { display: { ...view.detail.display, kind } });
    if (current === view) { renderScreen(); renderDetails(); }
  } catch (error) {
    toast(error.message, 'error');
  }
}

function openConsole() {
  if (current.terminal) { current.terminal.refit(); current.terminal.focus(); return; }
  const panel = current.panels.console;
  const box = h('div', { class: 'terminal', id: 'terminal' });
  panel.replaceChildren(
    h('div', { class: 'console-toolbar' },
      h('p', { class: 'hint console-hint' }, 'The VM’s serial console. Click into it and type; Linux guests print their ' +
                                             'boot messages and a login here when their kernel has console=ttyS0.'),
      h('button', { type: 'button', id: 'console-clear', onclick: () => { current?.terminal?.clear(); current?.terminal?.focus(); } },
        'Clear')),
    box);
  current.terminal = new SerialTerminal(box, current.id);
  current.terminal.open();
  current.terminal.focus();
}

function openLogs() {
  if (current.logs) { current.logs.load(); return; }
  current.logs = new LogPanel(current.panels.logs, current.id);
  current.logs.load('events');
}

function renderDetails() {
  if (!current || !current.detail) return;
  const vm = current.detail;
  const panel = current.panels.details;
  const row = (label, ...value) => h('tr', {}, h('th', { scope: 'row' }, label), h('td', {}, ...value));
  const nic = vm.nics[0];
  const forwards = nic?.forwards?.length
    ? nic.forwards.map((f) => `${f.protocol} ${f.host_address}:${f.host_port} → guest ${f.guest_port}`).join(', ')
    : 'none';
  panel.replaceChildren(h('table', { class: 'details' }, h('tbody', {},
    row('Operating system', vm.os),
    row('Memory', formatRam(vm.ram_mib)),
    row('Virtual CPUs', String(vm.cpus)),
    row('Firmware', vm.firmware),
    row('TPM', vm.tpm, vm.status?.tpm && UP.has(state()) ? ` · in use: ${vm.status.tpm.detail}` : ''),
    row('Machine / accelerator', `${vm.machine} / ${vm.accel}`,
        vm.status?.accel && UP.has(state()) ? ` (running on ${vm.status.accel})` : ''),
    row('Screen', { vnc: 'embedded (VNC)', native: "QEMU's own window", none: 'none' }[vm.display.kind] || vm.display.kind),
    row('CD drive', vm.cdroms.length ? vm.cdroms.map((c) => c.path || 'empty').join(', ') : 'none'),
    row('Disks', vm.disks.length ? vm.disks.map((d) => h('div', {}, h('code', {}, d.path), ` (${d.format}, ${d.bus})`)) : 'none'),
    row('Network', nic ? `${nic.mode} · ${nic.model} · ${nic.mac}` : 'none'),
    row('Port forwards', forwards),
    row('Boot order', vm.boot_order.join(' → ')),
    row('Folder', h('code', {}, vm.folder || '')),
  )));
}

// -- dropped files ---------------------------------------------------------------------------------------
function usePaths(paths) {
  const path = paths.find(Boolean);
  if (!path) return;
  if (!openForm && downloads.usePath(path)) {
    toast(`Using ${path}; press Add ISO to check and add it`, 'ok');
    return;
  }
  if (openForm) {
    const where = openForm.usePath(path);
    toast(`Using ${path} as the ${where === 'disk' ? 'disk image' : 'ISO'}`, 'ok');
    return;
  }
  pendingPath = path;
  closeVm();
  go('#/new');
}

const overlay = document.getElementById('drop-overlay');
const carriesFiles = (event) => [...(event.dataTransfer?.types || [])].some((type) =>
  type === 'Files' || type === 'text/uri-list');
window.addEventListener('dragover', (event) => {
  if (!carriesFiles(event)) return;
  event.preventDefault();
  overlay.hidden = false;
});
window.addEventListener('dragleave', (event) => {
  if (!event.relatedTarget) overlay.hidden = true;
});
window.addEventListener('drop', (event) => {
  overlay.hidden = true;
  if (!carriesFiles(event)) return;
  event.preventDefault();
  if (window.pywebview) return;   // the window sends the full paths as a thalunix-drop event
  const uris = (event.dataTransfer.getData('text/uri-list') || '').split(/\r?\n/)
    .filter((line) => line && !line.startsWith('#'));
  const paths = uris.map(pathFromFileUrl).filter(Boolean);
  if (paths.length) { usePaths(paths); return; }
  if (event.dataTransfer.files?.length) {
    toast('This browser does not tell Thalunix where a dropped file lives; type its full path in the form instead.', 'error');
    if (!openForm) go('#/new');
  }
});
window.addEventListener('thalunix-drop', (event) => {
  overlay.hidden = true;
  usePaths(event.detail?.paths || []);
});

// -- start -----------------------------------------------------------------------------------------------
function markBridge() {
  document.body.classList.toggle('has-bridge', Boolean(window.pywebview?.api?.pick_file));
}
window.addEventListener('pywebviewready', markBridge);
markBridge();
initTheme(document.getElementById('theme'));
hosts.initHosts(document.getElementById('hosts-panel'));
document.getElementById('new-vm').addEventListener('click', () => { closeVm(); go('#/new'); });
document.getElementById('import-vm').addEventListener('click', () => storage.openImport());
storage.initStorage({ go });
downloads.initDownloads({ nav: document.getElementById('nav-downloads'),
                          onCreateVm: (preset) => { pendingPreset = preset; go('#/new'); } });
renderList();
