/**
 * libvirt hosts in the sidebar: below the portable folder's VMs, one group per host with its VMs, or the
 * host's connection error and its cause (unreachable, authentication, permission, no QEMU driver) — one host
 * failing never hides the others (the API asks them in parallel, each with a timeout). Hosts are added and
 * removed here; a host's VMs can be started, shut down and forced off, and show "read-only parts" when their
 * XML holds things Thalunix does not model (kept as they are).
 *
 * Example:
 *   import { initHosts } from './hosts.js';
 *   initHosts(document.getElementById('hosts-panel'));
 */

import { ApiError, request } from './api.js';
import { confirmAction, formatRam, h, toast } from './ui.js';

const CAUSES = { unreachable: 'Unreachable', authentication: 'Authentication failed', permission: 'Permission denied',
                 'no-qemu': 'No QEMU driver', missing: 'libvirt-python missing', error: 'Connection failed' };
const STATES = { stopped: 'Stopped', running: 'Running', paused: 'Paused', stopping: 'Stopping…', crashed: 'Crashed' };
const REFRESH_SECONDS = 30;

let panel = null;
let hosts = null;               // last GET /api/hosts, or null before the first answer
let busy = false;
let again = false;

// One HTTP helper for the whole UI: api.js's request (errors as ApiError with the API's field).
const call = request;

const hostPath = (host, rest = '') => `/api/hosts/${encodeURIComponent(host)}${rest}`;
export const listHosts = () => call('GET', '/api/hosts');
export const addHost = (name, uri) => call('POST', '/api/hosts', { name, uri });
export const removeHost = (name) => call('DELETE', hostPath(name));
export const hostAction = (host, vm, verb, body) =>
  call('POST', hostPath(host, `/vms/${encodeURIComponent(vm)}/${verb}`), body);

/** Fetch the hosts again (coalesced: one request at a time, one more if asked meanwhile). */
export async function refresh() {
  if (busy) { again = true; return; }
  busy = true;
  try {
    hosts = await listHosts();
  } catch (error) {
    hosts = hosts || [];
    toast(`Hosts: ${error.message}`, 'error');
  } finally {
    busy = false;
  }
  render();
  if (again) { again = false; refresh(); }
}

function vmRow(host, vm) {
  const specs = [vm.cpus === 1 ? '1 vCPU' : `${vm.cpus} vCPUs`, formatRam(vm.ram_mib)].filter(Boolean).join(' · ');
  const up = ['running', 'paused'].includes(vm.state);
  const act = (verb, body) => async () => {
    try {
      await hostAction(host.name, vm.name, verb, body);
    } catch (error) {
      toast(error.message, 'error');
    }
    refresh();
  };
  const foreign = vm.unmodeled?.length
    ? h('span', { class: 'host-readonly', title: `Kept as they are, not shown: ${vm.unmodeled.join(', ')}` },
        `${vm.unmodeled.length} read-only part${vm.unmodeled.length === 1 ? '' : 's'}`) : null;
  return h('li', { class: 'host-vm', dataset: { host: host.name, name: vm.name, state: vm.state } },
    h('span', { class: 'entry-text' },
      h('span', { class: 'entry-name' }, vm.name),
      h('span', { class: 'entry-specs' }, specs, vm.managed ? '' : ' · defined elsewhere'),
      h('span', { class: `badge state-${vm.state}`, dataset: { state: vm.state } }, STATES[vm.state] || vm.state),
      foreign),
    h('span', { class: 'host-vm-actions' },
      up ? h('button', { type: 'button', onclick: act('stop', { timeout: 60 }) }, 'Shut down')
         : h('button', { type: 'button', onclick: act('start') }, 'Start'),
      up ? h('button', { type: 'button', class: 'danger', onclick: act('stop', { force: true }) }, 'Force off') : null));
}

function hostGroup(host) {
  const remove = async () => {
    if (!await confirmAction({ title: `Remove host ${host.name}?`, ok: 'Remove',
                               text: `Its VMs stay on ${host.uri}; only the entry in the list goes.` })) return;
    try { await removeHost(host.name); } catch (error) { toast(error.message, 'error'); }
    refresh();
  };
  const body = host.state === 'error'
    ? h('div', { class: 'host-error', role: 'alert', dataset: { cause: host.cause || 'error' } },
        h('strong', {}, CAUSES[host.cause] || CAUSES.error), h('span', {}, host.error || ''))
    : host.vms.length
      ? h('ul', { class: 'host-vms' }, ...host.vms.map((vm) => vmRow(host, vm)))
      : h('div', { class: 'host-empty' }, 'No VMs on this host');
  return h('section', { class: 'host-group', dataset: { host: host.name, state: host.state } },
    h('div', { class: 'host-title' },
      h('span', { class: 'host-name' }, host.name),
      h('span', { class: 'host-uri', title: host.uri }, host.uri),
      h('button', { type: 'button', class: 'host-remove', title: `Remove host ${host.name}`, onclick: remove }, '×')),
    body);
}

function addForm() {
  const name = h('input', { name: 'host-name', placeholder: 'name', required: true, size: 8, 'aria-label': 'Host name' });
  const uri = h('input', { name: 'host-uri', placeholder: 'qemu+ssh://user@host/system', required: true,
                           'aria-label': 'libvirt URI' });
  const submit = async (event) => {
    event.preventDefault();
    try {
      await addHost(name.value.trim(), uri.value.trim());
      name.value = ''; uri.value = '';
      toast('Host added; connecting…');
    } catch (error) {
      toast(error.message, 'error');
      (error.field === 'uri' ? uri : name).focus();
      return;
    }
    refresh();
  };
  return h('form', { class: 'host-add', onsubmit: submit }, name, uri, h('button', { type: 'submit' }, 'Add host'));
}

function render() {
  if (!panel) return;
  const groups = hosts === null ? [h('div', { class: 'host-empty' }, 'Asking the hosts…')] : hosts.map(hostGroup);
  panel.replaceChildren(h('h2', { class: 'hosts-heading' }, 'libvirt hosts'), ...groups, addForm());
}

const STYLE = `
.hosts-panel { padding: 8px; border-top: 1px solid var(--border, #d8dce3); }
.hosts-heading { font-size: 13px; text-transform: uppercase; letter-spacing: .04em; opacity: .7; margin: 4px 4px 8px; }
.host-group { margin: 0 0 10px; padding: 6px; border-radius: 8px; background: var(--panel, rgba(127,127,127,.06)); }
.host-title { display: flex; gap: 6px; align-items: baseline; }
.host-name { font-weight: 600; }
.host-uri { flex: 1; font-size: 11px; opacity: .65; overflow: hidden; text-overflow: ellipsis; white-space: nowrap; }
.host-remove { border: 0; background: none; cursor: pointer; font-size: 16px; opacity: .6; }
.host-vms { list-style: none; margin: 4px 0 0; padding: 0; }
.host-vm { display: flex; justify-content: space-between; gap: 6px; padding: 4px 2px; }
.host-vm .entry-text { display: flex; flex-direction: column; }
.host-vm-actions { display: flex; flex-direction: column; gap: 2px; }
.host-readonly { font-size: 11px; opacity: .7; }
.host-error { font-size: 12px; color: var(--danger, #b3261e); display: flex; flex-direction: column; gap: 2px;
              word-break: break-word; }
.host-empty { font-size: 12px; opacity: .7; padding: 2px 4px; }
.host-add { display: flex; flex-wrap: wrap; gap: 4px; }
.host-add input[name=host-uri] { flex: 1; min-width: 120px; }
`;

/** Mount the panel in `element` and keep it current (events from libvirt hosts carry `host`). */
export function initHosts(element) {
  panel = element;
  panel.classList.add('hosts-panel');
  document.head.append(h('style', {}, STYLE));
  render();
  refresh();
  setInterval(refresh, REFRESH_SECONDS * 1000);
}

/** An event from the stream: refresh when it concerns a host (they carry `host`). */
export function onEvent(event) {
  if (event && event.host) refresh();
}
