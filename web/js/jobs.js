/**
 * Long operations (disk convert, clone, export, import) as the page sees them: the jobs of this session,
 * kept up to date by `job.progress` events from the page's one event stream — never polled — and live
 * progress bars with a Cancel button that follow a job wherever they are shown.
 *
 * A job's answer (POST … → 202 {id, state: "running"}) and its events may arrive in either order; the
 * state never goes back from a final one. When a job ends, its result is read once (GET /api/jobs/{id})
 * and handed to whoever waits for it.
 *
 * Example:
 *   import * as jobs from './jobs.js';
 *   const job = jobs.remember(await api.request('POST', `/api/vms/${id}/export`, { file }));
 *   panel.append(jobs.progressBlock(job, 'Export of web'));
 *   const finished = await jobs.finished(job.id);   // { state: 'done', result: {file, size}, … }
 *   api.events({ 'job.progress': jobs.onProgress, … });
 */
import * as api from './api.js';
import { confirmAction, h, toast } from './ui.js';

export const FINAL = new Set(['done', 'failed', 'cancelled']);
/** Job kinds this module follows (downloads have their own page and queue). */
const KINDS = new Set(['disk.convert', 'vm.clone', 'vm.export', 'vm.import', 'vm.move', 'vm.copy-in', 'vm.copy-out']);
const WORDS = { running: 'Working…', done: 'Done', failed: 'Failed', cancelled: 'Cancelled' };

const jobs = new Map();          // id → the latest job dict
const watchers = new Map();      // id → Set of functions called with the job on every change
const waiting = new Map();       // id → Promise of the finished job (with its result)

export const listJobs = () => api.request('GET', '/api/jobs');
export const getJob = (id) => api.request('GET', `/api/jobs/${encodeURIComponent(id)}`);
export const cancelJob = (id) => api.request('POST', `/api/jobs/${encodeURIComponent(id)}/cancel`);

/** Take a job dict (an answer or an event) into the map; tell its watchers. Returns the merged job. */
export function remember(job) {
  const before = jobs.get(job.id);
  const merged = { ...(before || {}), ...job };
  if (before && FINAL.has(before.state) && !FINAL.has(job.state)) {
    // An answer that left the server before the job's last event: the event is newer.
    merged.state = before.state;
    merged.percent = before.percent;
    merged.message = before.message;
  } else if (before && job.state === 'running' && (job.percent ?? 0) < (before.percent ?? 0)) {
    merged.percent = before.percent;
  }
  jobs.set(job.id, merged);
  for (const watcher of watchers.get(job.id) || []) watcher(merged);
  return merged;
}

/** A job.progress event of the stream. */
export function onProgress(event) {
  if (!event.job || !KINDS.has(event.kind)) return;
  const { job: id, type, time, ...rest } = event;
  remember({ id, ...rest });
}

/** After the stream (re)connects: jobs that moved or ended while it was down are read once. */
export async function resync() {
  try {
    for (const job of await listJobs()) remember(job);
  } catch (error) {
    toast(error.message, 'error');
  }
}

export function get(id) {
  return jobs.get(id) || null;
}

/** Running jobs of one VM (the panels show them, whoever started them). */
export function runningFor(vmId, kind = null) {
  return [...jobs.values()].filter((job) => job.vm === vmId && job.state === 'running' && (!kind || job.kind === kind));
}

/** Call `fn(job)` on every change of job `id`; returns the function that stops it. */
export function watch(id, fn) {
  if (!watchers.has(id)) watchers.set(id, new Set());
  watchers.get(id).add(fn);
  return () => watchers.get(id)?.delete(fn);
}

/** Resolves with the job once it has ended, its result read from the API once. */
export function finished(id) {
  if (waiting.has(id)) return waiting.get(id);
  const promise = new Promise((resolve) => {
    const check = (job) => {
      if (!FINAL.has(job.state)) return;
      stop();
      getJob(id).then((full) => resolve(remember(full))).catch(() => resolve(job));
    };
    const stop = watch(id, check);
    if (jobs.has(id)) check(jobs.get(id));
  });
  waiting.set(id, promise);
  return promise;
}

function percentOf(job) {
  if (job.state === 'done') return 100;
  return Math.max(0, Math.min(100, Number(job.percent) || 0));
}

function describe(job) {
  if (job.state === 'running') return `${percentOf(job).toFixed(0)}% · ${job.message || WORDS.running}`;
  if (job.state === 'failed') return `Failed: ${job.error || job.message}`;
  if (job.state === 'cancelled') return 'Cancelled; nothing was changed';
  return job.message && job.message !== 'done' ? `Done: ${job.message}` : 'Done';
}

function fill(block, job) {
  block.dataset.state = job.state;
  const percent = percentOf(job);
  const bar = block.querySelector('.progress');
  bar.setAttribute('aria-valuenow', percent.toFixed(1));
  block.querySelector('.progress-fill').style.width = `${percent}%`;
  block.querySelector('.progress-text').textContent = describe(job);
  const cancel = block.querySelector('.job-cancel');
  if (cancel) cancel.hidden = job.state !== 'running';
}

/**
 * A progress bar for job `job` (dict or id) that moves by itself, with a Cancel button while it runs.
 * It stops following the job once it is taken out of the page.
 */
export function progressBlock(job, label, { cancellable = true } = {}) {
  const current = typeof job === 'string' ? (jobs.get(job) || { id: job, state: 'running', percent: 0 }) : job;
  const cancel = cancellable ? h('button', { type: 'button', class: 'job-cancel danger-outline', dataset: { job: current.id },
                                             onclick: () => askCancel(jobs.get(current.id) || current, label) }, 'Cancel') : null;
  const block = h('div', { class: 'progress-block job-progress', dataset: { job: current.id, kind: current.kind || '' } },
    h('div', { class: 'job-line' },
      h('div', { class: 'progress', role: 'progressbar', 'aria-valuemin': 0, 'aria-valuemax': 100, 'aria-label': label },
        h('div', { class: 'progress-fill' })),
      cancel),
    h('div', { class: 'progress-text', 'aria-live': 'off' }));
  fill(block, current);
  const stop = watch(current.id, (latest) => {
    if (!block.isConnected && block.dataset.shown) { stop(); return; }
    fill(block, latest);
  });
  // Marked once drawn, so a block made before it is inserted is not dropped on its first update.
  requestAnimationFrame(() => { block.dataset.shown = '1'; });
  return block;
}

async function askCancel(job, label) {
  const yes = await confirmAction({ title: `Cancel ${label.toLowerCase()}?`,
                                    text: 'It stops at its next step and removes what it made so far; nothing else changes.',
                                    ok: 'Cancel it' });
  if (!yes) return;
  try {
    remember(await cancelJob(job.id));
  } catch (error) {
    toast(error.message, 'error');
  }
}
