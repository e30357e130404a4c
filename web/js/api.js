/**
 * The local API as async functions, and the one event stream.
 *
 * Every call goes to the page's own origin; the launch cookie authenticates it. A failed call
 * throws ApiError carrying the API's `message` and the `field` at fault, so forms can show the
 * message next to that field.
 *
 * Example:
 *   import * as api from './api.js';
 *   const vms = await api.listVms();
 *   try { await api.startVm(vm.id); } catch (e) { toast(e.message); }
 *   api.events({ 'vm.state': (e) => …, ready: () => … });
 */

export class ApiError extends Error {
  constructor(status, payload) {
    super(payload?.message || `The request failed (HTTP ${status})`);
    this.status = status;
    this.code = payload?.error || 'error';
    this.field = payload?.field || null;
  }
}

const vmPath = (id, rest = '') => `/api/vms/${encodeURIComponent(id)}${rest}`;

async function call(method, path, body) {
  const options = { method, headers: {}, credentials: 'same-origin' };
  if (body !== undefined) {
    options.headers['Content-Type'] = 'application/json';
    options.body = JSON.stringify(body);
  }
  let response;
  try {
    response = await fetch(path, options);
  } catch (error) {
    throw new ApiError(0, { error: 'offline', message: 'Thalunix is not answering; is it still running?' });
  }
  const text = await response.text();
  let payload = null;
  try { payload = text ? JSON.parse(text) : null; } catch (e) { payload = { message: text.slice(0, 200) }; }
  if (!response.ok) throw new ApiError(response.status, payload);
  return payload;
}

/** Any route: request('POST', '/api/vms/web/clone', { name: 'web-2' }) — for modules with routes of their own. */
export const request = (method, path, body) => call(method, path, body);
export const listVms = () => call('GET', '/api/vms');
export const getVm = (id) => call('GET', vmPath(id));
export const createVm = (options) => call('POST', '/api/vms', options);
export const editVm = (id, changes) => call('PATCH', vmPath(id), changes);
export const deleteVm = (id, keepDisks = false) => call('DELETE', vmPath(id, keepDisks ? '?keep_disks=true' : ''));
export const action = (id, verb, body) => call('POST', vmPath(id, `/${verb}`), body);
export const readConsole = (id) => call('GET', vmPath(id, '/console'));
export const typeConsole = (id, data) => call('POST', vmPath(id, '/console'), { data });
export const vncInfo = (id) => call('GET', vmPath(id, '/vnc'));
export const readLog = (id, kind) => call('GET', vmPath(id, `/log?kind=${encodeURIComponent(kind)}&tail=262144`));
export const listIsos = () => call('GET', '/api/isos');
export const win11Setup = () => call('GET', '/api/win11-setup');
export const firmwareInfo = (id) => call('GET', vmPath(id, '/firmware'));
export const resetFirmware = (id) => call('POST', vmPath(id, '/firmware/reset'));
export const addIso = (body) => call('POST', '/api/isos', body);
export const catalog = () => call('GET', '/api/catalog');
export const listDownloads = () => call('GET', '/api/downloads');
export const startDownload = (source, sha256 = null) => call('POST', '/api/downloads', { source, sha256 });
export const downloadAction = (id, verb) => call('POST', `/api/downloads/${encodeURIComponent(id)}/${verb}`);
export const removeQuarantined = (id) => call('DELETE', `/api/quarantine/${encodeURIComponent(id)}`);
export const screenshotUrl = (id) => vmPath(id, `/screenshot?at=${Date.now()}`);

/**
 * Open the server-sent event stream. `handlers` maps event types (and `ready`, `down`) to functions.
 * EventSource reconnects by itself; `ready` fires after each (re)connection, so callers resync there.
 */
export function events(handlers) {
  const source = new EventSource('/api/events');
  const parse = (event) => { try { return JSON.parse(event.data); } catch (e) { return {}; } };
  for (const [type, handler] of Object.entries(handlers)) {
    if (type === 'down') continue;
    source.addEventListener(type, (event) => handler(parse(event)));
  }
  source.addEventListener('error', () => handlers.down?.(source.readyState));
  return source;
}
