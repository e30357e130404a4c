/**
 * The ISOs page (#/downloads): the catalog of operating systems as cards, live download progress,
 * the ISO list with statuses, and adding an ISO from this computer.
 *
 * Progress is never polled: `job.progress` events (kind "download") from the page's one event stream
 * move the bars in place (bytes, rate, ETA); a change of a job's state redraws its card and reloads
 * the ISO list once. The jobs are followed while the page is hidden too, so the top bar's link can
 * count the downloads running.
 *
 * Example (js/app.js):
 *   initDownloads({ onCreateVm: (preset) => { pendingPreset = preset; go('#/new'); } });
 *   showDownloads(main);                       // on #/downloads
 *   api.events({ 'job.progress': onProgress, … });
 *   applyPreset(form, preset);                 // fill the VM form with a catalog entry's defaults
 */
import * as api from './api.js';
import { confirmAction, formatRam, h, parseRamMib, toast } from './ui.js';

const ACTIVE = new Set(['queued', 'resolving', 'downloading', 'verifying', 'extracting']);
const TRUST = {
  signed: ['Signed', 'The publisher signs its checksums; Thalunix checks the signature and the checksum'],
  'checksum only': ['Checksum only', 'The publisher offers checksums but no signature; Thalunix checks the checksum'],
  'no checksum': ['No checksum', 'The publisher offers no checksum: type the SHA-256 from a source you trust'],
  manual: ['Manual download', 'Download it from the publisher, then add the file here'],
  'user hash': ['Your SHA-256', 'Checked against the SHA-256 you typed'],
  local: ['Not checked', 'Added from this computer without a SHA-256'],
};
const STATUS = { ready: 'Ready', missing: 'File missing', downloading: 'Downloading', verifying: 'Verifying',
                 quarantined: 'Quarantined' };
const STATUS_ORDER = { downloading: 0, verifying: 1, ready: 2, missing: 3, quarantined: 4 };
const FIRMWARE = { uefi: 'UEFI', 'uefi-secure': 'UEFI + Secure Boot', bios: 'BIOS' };
const LOGO_COLOURS = { ubuntu: '#e95420', fedora: '#3c6eb4', debian: '#a80030', linuxmint: '#69a82e', alpine: '#0d597f',
                       arch: '#1793d1', opensuse: '#5a9a1b', almalinux: '#0b5d8e', freebsd: '#ab2b28',
                       windows: '#0078d4' };
const HEX = /^\s*([0-9a-fA-F]{64}|[0-9a-fA-F]{128})\s*$/;

const jobs = new Map();          // job id → the latest job dict (GET /api/downloads, then job.progress events)
let entries = [];                // GET /api/catalog
let isos = [];                   // GET /api/isos
let view = null;                 // the page on screen: { root, list, grid, addForm, … }
let createVm = () => {};
let navLink = null;

// -- numbers a person reads ----------------------------------------------------------------------------------
/** 780000000 → "780 MB", 6.2e9 → "6.2 GB" (decimal units, as publishers state sizes). */
export function formatBytes(bytes) {
  if (bytes === null || bytes === undefined) return '';
  const units = ['bytes', 'kB', 'MB', 'GB', 'TB'];
  let value = bytes;
  let unit = 0;
  while (value >= 1000 && unit < units.length - 1) { value /= 1000; unit += 1; }
  if (unit === 0) return `${value} bytes`;
  return `${value >= 100 ? Math.round(value) : +value.toFixed(1)} ${units[unit]}`;
}

/** 75 → "1:15 left", 4000 → "1 h 7 min left". */
export function formatEta(seconds) {
  if (seconds === null || seconds === undefined || !Number.isFinite(seconds)) return '';
  const s = Math.max(0, Math.round(seconds));
  if (s >= 3600) return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min left`;
  return `${Math.floor(s / 60)}:${String(s % 60).padStart(2, '0')} left`;
}

function defaultsText(defaults) {
  if (!defaults) return '';
  const ram = parseRamMib(defaults.ram || '');
  return [ram ? `${formatRam(ram)} RAM` : null, defaults.disk ? `${String(defaults.disk).replace(/G$/i, ' GiB')} disk` : null,
          FIRMWARE[defaults.firmware] || defaults.firmware,
          { on: 'TPM', off: 'no TPM', auto: 'TPM if the host can' }[defaults.tpm] || (defaults.tpm ? `TPM ${defaults.tpm}` : null)]
    .filter(Boolean).join(' · ');
}

function trustLabel(trust) {
  const [text, title] = TRUST[trust] || [trust || 'Unknown', ''];
  return h('span', { class: 'trust', dataset: { trust: trust || 'unknown' }, title }, text);
}

// -- jobs and their bars --------------------------------------------------------------------------------------
function jobFor(entry) {
  let found = null;
  for (const job of jobs.values()) {
    if ((job.catalog_id || job.source) === entry.id && (!found || job.created >= found.created)) found = job;
  }
  return found;
}

function progressText(job) {
  const of = job.total ? `${formatBytes(job.bytes)} of ${formatBytes(job.total)}` : formatBytes(job.bytes);
  switch (job.state) {
    case 'queued': return 'Waiting for a free download slot…';
    case 'resolving': return 'Finding the current image and its checksum…';
    case 'downloading': {
      const parts = [job.bytes ? of : 'Starting…'];
      if (job.percent !== null && job.percent !== undefined) parts[0] += ` (${job.percent.toFixed(1)}%)`;
      if (job.rate > 0) parts.push(`${formatBytes(job.rate)}/s`);
      if (job.eta !== null && job.eta !== undefined) parts.push(formatEta(job.eta));
      return parts.join(' · ');
    }
    case 'paused': return `Paused at ${of}`;
    case 'verifying': return 'Verifying the checksum and signature…';
    case 'extracting': return 'Extracting the image…';
    case 'ready': return `Downloaded and verified (${TRUST[job.trust]?.[0]?.toLowerCase() || job.trust})`;
    case 'failed': return `Failed: ${job.error || job.message}`;
    case 'cancelled': return 'Cancelled';
    case 'quarantined': return 'Quarantined: it did not verify, so it is not offered for use (the reason is in Your ISOs)';
    default: return job.message || job.state;
  }
}

function fillProgress(block, job) {
  const known = job.total ? Math.min(100, (100 * job.bytes) / job.total) : null;
  const done = job.state === 'ready' || job.state === 'verifying' || job.state === 'extracting';
  const percent = done ? 100 : known;
  block.dataset.state = job.state;
  const bar = block.querySelector('.progress');
  bar.classList.toggle('indeterminate', percent === null && ACTIVE.has(job.state));
  bar.setAttribute('aria-valuenow', percent === null ? '' : percent.toFixed(1));
  block.querySelector('.progress-fill').style.width = `${percent === null ? 0 : percent}%`;
  block.querySelector('.progress-text').textContent = progressText(job);
}

function progressBlock(job) {
  const block = h('div', { class: 'progress-block', dataset: { job: job.id } },
    h('div', { class: 'progress', role: 'progressbar', 'aria-valuemin': 0, 'aria-valuemax': 100,
               'aria-label': `Download of ${job.filename || job.source}` }, h('div', { class: 'progress-fill' })),
    h('div', { class: 'progress-text', 'aria-live': 'off' }));
  fillProgress(block, job);
  return block;
}

async function jobAction(job, verb) {
  if (verb === 'cancel') {
    const yes = await confirmAction({ title: `Cancel the download of ${job.filename || job.source}?`,
                                      text: 'The part downloaded so far is deleted.', ok: 'Cancel download' });
    if (!yes) return;
  }
  try {
    remember(await api.downloadAction(job.id, verb));
  } catch (error) {
    toast(error.message, 'error');
  }
}

function jobButtons(job) {
  const button = (verb, label, extra = {}) => h('button', {
    type: 'button', class: `job-${verb}`, dataset: { job: job.id }, onclick: () => jobAction(job, verb), ...extra }, label);
  if (['queued', 'resolving', 'downloading'].includes(job.state)) {
    return [button('pause', 'Pause'), button('cancel', 'Cancel', { class: 'job-cancel danger-outline' })];
  }
  if (job.state === 'paused') return [button('resume', 'Resume', { class: 'job-resume primary' }), button('cancel', 'Cancel', { class: 'job-cancel danger-outline' })];
  if (job.state === 'failed') return [button('resume', 'Retry', { class: 'job-resume primary' }), button('cancel', 'Cancel', { class: 'job-cancel danger-outline' })];
  return [];
}

/** Take a job dict (from an answer or an event); redraw what depends on its state when that changed. */
function remember(job) {
  const before = jobs.get(job.id);
  // An HTTP answer can arrive after the events of a download that already moved on (a quick failure):
  // the older copy must not put the card back.
  if (before && job.revision !== undefined && before.revision > job.revision) return;
  jobs.set(job.id, { ...(before || {}), ...job });
  const now = jobs.get(job.id);
  for (const block of document.querySelectorAll(`.progress-block[data-job="${CSS.escape(job.id)}"]`)) fillProgress(block, now);
  updateNav();
  if (!before || before.state !== now.state) {
    if (now.state === 'ready' && before && before.state !== 'ready') toast(`${now.filename} is ready`, 'ok');
    if (now.state === 'quarantined' && before && before.state !== 'quarantined') {
      toast(`${now.filename} did not verify and was quarantined; the reason is in Your ISOs`, 'error');
    }
    if (view) {
      redrawCard(now.catalog_id || now.source);
      loadIsos();
    }
  }
}

/** A job.progress event of the stream (all kinds of jobs come this way; only downloads are ours). */
export function onProgress(event) {
  if (event.kind !== 'download' || !event.job) return;
  const { job: id, type, time, ...rest } = event;
  remember({ id, ...rest });
}

function updateNav() {
  if (!navLink) return;
  const running = [...jobs.values()].filter((job) => ACTIVE.has(job.state)).length;
  const count = navLink.querySelector('.nav-count');
  count.textContent = running ? String(running) : '';
  count.hidden = !running;
  navLink.title = running ? `${running} download${running === 1 ? '' : 's'} running` : 'Download an OS or add an ISO';
}

async function loadJobs() {
  try {
    for (const job of await api.listDownloads()) remember(job);
  } catch (error) {
    toast(error.message, 'error');
  }
}

// -- the page -------------------------------------------------------------------------------------------------
export function initDownloads({ onCreateVm, nav }) {
  createVm = onCreateVm;
  navLink = nav;
  updateNav();
  loadJobs();
}

/** After the event stream (re)connects: what changed while it was down is read once. */
export function onReconnect() {
  jobs.clear();   // a restarted Thalunix counts revisions from 0 again
  loadJobs();
  if (view) loadIsos();
}

export function downloadsShown() {
  return view !== null;
}

export function hideDownloads() {
  view = null;
}

export function showDownloads(container) {
  const grid = h('div', { class: 'catalog-grid', id: 'catalog' }, h('p', { class: 'muted' }, 'Loading the catalog…'));
  const list = h('ul', { class: 'iso-list', id: 'iso-list' }, h('li', { class: 'muted' }, 'Loading…'));
  const keysNote = h('p', { class: 'hint keys-note', id: 'keys-note', hidden: true });
  view = { grid, list, keysNote, addForm: addIsoForm() };
  container.replaceChildren(h('section', { class: 'downloads-page', id: 'downloads-page' },
    h('div', { class: 'page-head' },
      h('h1', {}, 'ISOs and downloads'),
      h('p', { class: 'hint' }, 'Download an installer from its publisher — Thalunix checks its checksum and, where the ' +
                                'publisher signs it, the signature — or add an ISO you already have.')),
    h('section', { class: 'iso-section', 'aria-labelledby': 'isos-title' },
      h('h2', { id: 'isos-title' }, 'Your ISOs'), list, view.addForm.element),
    h('section', { class: 'catalog-section', 'aria-labelledby': 'catalog-title' },
      h('h2', { id: 'catalog-title' }, 'Download an operating system'), keysNote, grid)));
  loadIsos();
  loadJobs();
  api.catalog().then((rows) => { entries = rows; if (view?.grid === grid) drawCatalog(); })
    .catch((error) => { grid.replaceChildren(h('p', { class: 'form-error' }, error.message)); });
}

/** A file dropped on the window while this page shows: it goes into the add form. */
export function usePath(path) {
  if (!view) return false;
  view.addForm.usePath(path);
  return true;
}

// -- the ISO list ---------------------------------------------------------------------------------------------
let loadingIsos = null;
async function loadIsos() {
  // One request at a time; a state change arriving meanwhile reads again once it is answered.
  if (loadingIsos) { loadingIsos.again = true; return; }
  loadingIsos = { again: false };
  try {
    isos = await api.listIsos();
    if (view) { drawIsos(); drawCatalog(); }
  } catch (error) {
    toast(error.message, 'error');
  } finally {
    const again = loadingIsos.again;
    loadingIsos = null;
    if (again) loadIsos();
  }
}

function presetFor(iso) {
  return { iso: iso.full_path, defaults: iso.defaults || null, from: iso.catalog_name || null };
}

function isoRow(iso) {
  const job = iso.job ? jobs.get(iso.job) : null;
  const meta = [iso.size ? formatBytes(iso.size) : null, iso.catalog_name || null,
                iso.used_by?.length ? `used by ${iso.used_by.join(', ')}` : null].filter(Boolean).join(' · ');
  const actions = [];
  if (iso.status === 'ready') {
    actions.push(h('button', { type: 'button', class: 'create-vm primary', onclick: () => createVm(presetFor(iso)) },
                   'Create a VM from this ISO'));
  }
  if (job && (iso.status === 'downloading')) actions.push(...jobButtons(job));
  if (iso.status === 'quarantined' && iso.job) {
    actions.push(h('button', { type: 'button', class: 'remove-quarantined danger-outline', onclick: () => removeQuarantined(iso) },
                   'Delete'));
  }
  return h('li', { class: 'iso-row', dataset: { status: iso.status, name: iso.name || '', job: iso.job || '' } },
    h('div', { class: 'iso-head' },
      h('span', { class: 'iso-name' }, iso.name || iso.job || '?'),
      h('span', { class: `badge status-${iso.status}`, dataset: { status: iso.status } }, STATUS[iso.status] || iso.status),
      iso.trust ? trustLabel(iso.trust) : null,
      h('span', { class: 'spacer' }),
      ...actions),
    meta ? h('div', { class: 'iso-meta' }, meta) : null,
    iso.full_path && iso.status !== 'quarantined' ? h('code', { class: 'iso-path' }, iso.full_path) : null,
    iso.status === 'downloading' || iso.status === 'verifying'
      ? progressBlock(job || { id: iso.job, state: iso.job_state || iso.status, bytes: iso.bytes || 0, total: iso.total,
                               filename: iso.name }) : null,
    iso.status === 'quarantined'
      ? h('p', { class: 'iso-reason', role: 'note' }, h('strong', {}, 'Not offered for use: '), iso.reason || 'it did not verify') : null,
    iso.status === 'missing' ? h('p', { class: 'iso-reason' }, 'The file is gone from where it was registered.') : null);
}

async function removeQuarantined(iso) {
  const yes = await confirmAction({ title: `Delete the quarantined ${iso.name}?`,
                                    text: 'The file that did not verify and the evidence kept with it are deleted.',
                                    ok: 'Delete' });
  if (!yes) return;
  try {
    await api.removeQuarantined(iso.job);
    toast(`Deleted the quarantined ${iso.name}`, 'ok');
  } catch (error) {
    toast(error.message, 'error');
  }
  loadIsos();
}

function drawIsos() {
  const rows = [...isos].sort((a, b) => (STATUS_ORDER[a.status] ?? 9) - (STATUS_ORDER[b.status] ?? 9)
                                        || String(a.name).localeCompare(String(b.name)));
  view.list.replaceChildren(...(rows.length ? rows.map(isoRow)
    : [h('li', { class: 'iso-empty muted' }, 'No ISOs yet. Download one below, or add one you have.')]));
}

// -- adding a local ISO ---------------------------------------------------------------------------------------
function bridge() {
  return window.pywebview?.api?.pick_file ? window.pywebview.api : null;
}

/** Path + optional SHA-256 form; `catalogId` registers the file as that catalog entry (Windows). */
function addIsoForm({ catalogId = null, idPrefix = 'iso-add', label = 'Add an ISO from this computer' } = {}) {
  const path = h('input', { type: 'text', id: `${idPrefix}-path`, autocomplete: 'off',
                            placeholder: 'full path of the ISO, e.g. /home/me/Downloads/installer.iso' });
  const sha = h('input', { type: 'text', id: `${idPrefix}-sha256`, autocomplete: 'off', spellcheck: false,
                           placeholder: 'expected SHA-256 (optional: 64 hex digits from the publisher)' });
  const browse = h('button', { type: 'button', class: 'needs-bridge', onclick: async () => {
    const chosen = await bridge()?.pick_file('iso');
    if (chosen) path.value = chosen;
  } }, 'Browse…');
  const errorFor = (key) => h('p', { class: 'field-error', role: 'alert', hidden: true, dataset: { for: key } });
  const errors = { path: errorFor('path'), sha256: errorFor('sha256'), other: errorFor('other') };
  const submit = h('button', { type: 'submit', class: 'primary', id: `${idPrefix}-submit` }, 'Add ISO');
  const form = h('form', { class: 'iso-add', id: idPrefix, novalidate: true },
    h('div', { class: 'iso-add-title' }, label),
    h('div', { class: 'field', dataset: { field: 'path' } },
      h('div', { class: 'row' }, path, browse), errors.path,
      bridge() ? null : h('p', { class: 'hint' }, 'Type the full path, or drag the file from your file manager onto this window.')),
    h('div', { class: 'field', dataset: { field: 'sha256' } }, h('div', { class: 'row' }, sha, submit), errors.sha256),
    errors.other);
  const clear = () => {
    for (const box of Object.values(errors)) { box.hidden = true; box.textContent = ''; }
    for (const wrap of form.querySelectorAll('.field.invalid')) wrap.classList.remove('invalid');
  };
  const show = (key, message) => {
    const box = errors[key] || errors.other;
    box.textContent = message;
    box.hidden = false;
    box.closest('.field')?.classList.add('invalid');
  };
  form.addEventListener('submit', async (event) => {
    event.preventDefault();
    clear();
    if (!path.value.trim()) { show('path', 'Give the full path of the ISO file'); path.focus(); return; }
    if (sha.value.trim() && !HEX.test(sha.value)) { show('sha256', 'A SHA-256 is 64 hex digits (0-9, a-f)'); sha.focus(); return; }
    submit.disabled = true;
    submit.textContent = 'Checking…';
    try {
      const row = await api.addIso({ path: path.value.trim(), sha256: sha.value.trim() || null, catalog_id: catalogId });
      toast(`Added ${row.name}${row.trust === 'user hash' ? ' (SHA-256 matches)' : ''}`, 'ok');
      path.value = '';
      sha.value = '';
      loadIsos();
    } catch (error) {
      show(error.field, error.message);
    } finally {
      submit.disabled = false;
      submit.textContent = 'Add ISO';
    }
  });
  return { element: form, usePath: (value) => { path.value = value; clear(); sha.focus(); } };
}

// -- the catalog ----------------------------------------------------------------------------------------------
/** What a card shows that can change: its latest job's state and whether a ready ISO of it exists. */
function cardSignature(entry) {
  const job = jobFor(entry);
  const ready = isos.filter((iso) => iso.catalog_id === entry.id && iso.status === 'ready').length;
  return `${job?.id || ''}:${job?.state || ''}:${ready}`;
}

/** Draw the cards; on later calls only those whose signature changed (text typed into the others stays). */
function drawCatalog() {
  if (!view || !entries.length) return;
  const missing = entries.filter((entry) => entry.trust === 'signed' && entry.keys_present === false);
  view.keysNote.hidden = !missing.length;
  view.keysNote.textContent = `The signing keys of ${missing.length} catalog ${missing.length === 1 ? 'entry are' : 'entries are'} ` +
    'not installed yet, so Thalunix will not download them: it never takes an image whose signature it cannot check. ' +
    'Fetch the keys with: thalunix iso catalog --refresh-keys';
  const drawn = new Map([...view.grid.querySelectorAll('.os-card')].map((element) => [element.dataset.entry, element]));
  if (drawn.size !== entries.length) { view.grid.replaceChildren(...entries.map(card)); return; }
  for (const entry of entries) {
    const element = drawn.get(entry.id);
    if (!element) { view.grid.replaceChildren(...entries.map(card)); return; }
    if (element.dataset.sig !== cardSignature(entry)) element.replaceWith(card(entry));
  }
}

function redrawCard(entryId) {
  const old = view?.grid.querySelector(`.os-card[data-entry="${CSS.escape(entryId || '')}"]`);
  const entry = entries.find((item) => item.id === entryId);
  if (old && entry && old.dataset.sig !== cardSignature(entry)) old.replaceWith(card(entry));
}

function logo(entry) {
  const family = entry.family || entry.id;
  return h('span', { class: 'os-logo', 'aria-hidden': 'true', style: `background:${LOGO_COLOURS[family] || '#6b7385'}` },
           (entry.name || '?').slice(0, 1).toUpperCase());
}

function card(entry) {
  const job = jobFor(entry);
  const ready = isos.filter((iso) => iso.catalog_id === entry.id && iso.status === 'ready');
  const body = [];
  if (entry.kind === 'manual') {
    // Thalunix cannot fetch it: the publisher's page and its steps, then the file is added as this entry.
    const add = addIsoForm({ catalogId: entry.id, idPrefix: `add-${entry.id}`, label: 'The ISO you downloaded:' });
    add.element.hidden = true;
    const reveal = h('button', { type: 'button', class: 'add-manual', id: `reveal-add-${entry.id}`, onclick: () => {
      add.element.hidden = false;
      reveal.hidden = true;
      add.element.querySelector('input').focus();
    } }, 'Add the downloaded ISO…');
    body.push(h('details', { class: 'card-steps' }, h('summary', {}, 'How to get the ISO'),
                h('p', { class: 'card-instructions' }, entry.instructions)),
              h('div', { class: 'card-buttons' },
                h('a', { class: 'button-link', href: entry.page, target: '_blank', rel: 'noopener noreferrer' },
                  `${entry.family === 'windows' ? "Microsoft's" : "Publisher's"} download page ↗`), reveal),
              add.element);
  } else if (job && !['cancelled', 'ready'].includes(job.state)) {
    body.push(progressBlock(job), h('div', { class: 'card-buttons' }, ...jobButtons(job)));
    if (job.state === 'quarantined') body.push(downloadControls(entry, 'Try again'));
  } else if (!ready.length) {
    body.push(downloadControls(entry, 'Download'));
  }
  if (ready.length) {
    body.push(h('div', { class: 'card-ready' },
      h('span', { class: 'ok-text' }, entry.kind === 'manual' ? '✓ ISO added' : '✓ Downloaded'),
      h('button', { type: 'button', class: 'create-vm primary', onclick: () => createVm(presetFor(ready[0])) }, 'Create a VM')));
  }
  return h('article', { class: 'os-card', dataset: { entry: entry.id, kind: entry.kind, trust: entry.trust,
                                                     sig: cardSignature(entry) } },
    h('div', { class: 'card-head' }, logo(entry),
      h('div', { class: 'card-title' },
        h('h3', {}, entry.name),
        h('span', { class: 'muted' }, [entry.version && entry.version !== 'latest' && entry.version !== 'current'
          ? `Version ${entry.version}` : 'Latest release', entry.arch].filter(Boolean).join(' · ')))),
    h('div', { class: 'card-tags' }, trustLabel(entry.trust),
      entry.size ? h('span', { class: 'size', title: 'Approximate download size' }, `≈ ${formatBytes(entry.size)}`) : null),
    h('p', { class: 'card-defaults', title: 'Settings of a VM made from it' }, defaultsText(entry.defaults)),
    ...body);
}

function downloadControls(entry, label) {
  const needsHash = entry.trust === 'no checksum';
  const keyMissing = entry.trust === 'signed' && entry.keys_present === false;
  const sha = needsHash ? h('input', { type: 'text', id: `sha-${entry.id}`, class: 'card-sha', autocomplete: 'off',
                                       spellcheck: false, placeholder: 'SHA-256 from a source you trust',
                                       'aria-label': `Expected SHA-256 of ${entry.name}` }) : null;
  const error = h('p', { class: 'field-error', role: 'alert', hidden: true });
  const button = h('button', { type: 'button', class: 'download primary', id: `download-${entry.id}`,
                               disabled: keyMissing || needsHash }, label);
  sha?.addEventListener('input', () => { button.disabled = !HEX.test(sha.value); error.hidden = true; });
  button.addEventListener('click', async () => {
    button.disabled = true;
    error.hidden = true;
    try {
      remember(await api.startDownload(entry.id, sha ? sha.value.trim() : null));
    } catch (failure) {
      error.textContent = failure.message;
      error.hidden = false;
      button.disabled = Boolean(needsHash && !HEX.test(sha.value));
    }
  });
  return h('div', { class: 'card-download' },
    needsHash ? h('p', { class: 'hint warn-text' }, 'The publisher offers no checksum. Thalunix downloads it only ' +
                                                   'with the SHA-256 you type.') : null,
    keyMissing ? h('p', { class: 'hint warn-text key-missing', title: 'thalunix iso catalog --refresh-keys fetches it' },
                   'Signing key not installed yet') : null,
    h('div', { class: 'row' }, sha, button), error);
}

// -- the VM form, filled in -----------------------------------------------------------------------------------
/**
 * In the new-VM form: choosing a downloaded catalog ISO (from the list or by path) fills in that entry's
 * defaults, as "Create a VM from this ISO" does. Settings the user changed by hand stay as they are.
 */
export function followIsoDefaults(element) {
  const iso = element.querySelector('#iso');
  if (!iso) return;
  const touched = new Set();
  for (const id of ['os', 'ram', 'firmware', 'tpm', 'disk-size']) {
    element.querySelector(`#${id}`)?.addEventListener('input', () => touched.add(id));
  }
  for (const radio of element.querySelectorAll('input[name="disk-mode"]')) {
    radio.addEventListener('change', () => touched.add('disk-size'));
  }
  let known = [];
  api.listIsos().then((rows) => { known = rows; }).catch(() => {});
  iso.addEventListener('change', () => {
    const chosen = known.find((row) => row.exists && row.defaults && (row.full_path === iso.value.trim() || row.path === iso.value.trim()));
    if (!chosen) return;
    const defaults = Object.fromEntries(Object.entries(chosen.defaults)
      .filter(([key]) => !touched.has(key === 'disk' ? 'disk-size' : key)));
    element.querySelector('#preset-note')?.remove();
    applyPreset(element, { defaults, from: chosen.catalog_name || chosen.name });
  });
}

/** Put a catalog entry's defaults into the new-VM form (after `form.usePath(preset.iso)`). */
export function applyPreset(element, preset) {
  const d = preset.defaults || {};
  const set = (id, value) => {
    const control = element.querySelector(`#${id}`);
    if (!control || value === undefined || value === null) return;
    if (control.tagName === 'SELECT' && ![...control.options].some((option) => option.value === value)) return;
    control.value = String(value);
  };
  set('os', d.os);
  set('ram', d.ram);
  set('firmware', d.firmware);
  set('tpm', d.tpm);
  if (d.disk) {
    const fresh = element.querySelector('input[name="disk-mode"][value="new"]');
    if (fresh && !fresh.checked) { fresh.checked = true; element.dispatchEvent(new Event('change')); }
    set('disk-size', d.disk);
  }
  if (preset.from) {
    element.querySelector('h1')?.after(h('p', { class: 'preset-note', id: 'preset-note' },
      `Filled in with the recommended settings for ${preset.from}. Change anything you like.`));
  }
}
