/**
 * Small DOM helpers shared by the views: an element builder, toasts, and the confirmation dialog.
 *
 * Example:
 *   import { h, toast, confirmAction } from './ui.js';
 *   main.append(h('p', { class: 'hint' }, 'No VMs yet'));
 *   if (await confirmAction({ title: 'Delete VM?', text: '…', ok: 'Delete' })) …
 */

/** Build an element: h('button', { class: 'primary', onclick: fn, disabled: true }, 'Start'). */
export function h(tag, attributes = {}, ...children) {
  const element = document.createElement(tag);
  for (const [key, value] of Object.entries(attributes || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (key.startsWith('on') && typeof value === 'function') {
      element.addEventListener(key.slice(2), value);
    } else if (key === 'dataset') {
      Object.assign(element.dataset, value);
    } else if (key in element && typeof value !== 'string') {
      element[key] = value;
    } else {
      element.setAttribute(key, value === true ? '' : value);
    }
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    element.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return element;
}

/** A short message in the corner; `kind` is info, error or ok. Errors stay longer. */
export function toast(message, kind = 'info') {
  const box = document.getElementById('toasts');
  const item = h('div', { class: `toast ${kind}`, role: kind === 'error' ? 'alert' : 'status' }, message);
  box.append(item);
  setTimeout(() => item.remove(), kind === 'error' ? 9000 : 4000);
  item.addEventListener('click', () => item.remove());
}

/**
 * Ask before something that cannot be undone. Resolves to false when cancelled, otherwise to
 * true, or to the state of the extra checkbox's `checked` when `checkbox` is given ({ checked }).
 */
export function confirmAction({ title, text, ok = 'OK', checkbox = null }) {
  const dialog = document.getElementById('confirm');
  document.getElementById('confirm-title').textContent = title;
  document.getElementById('confirm-text').textContent = text;
  document.getElementById('confirm-ok').textContent = ok;
  const extra = document.getElementById('confirm-extra');
  extra.replaceChildren();
  let box = null;
  if (checkbox) {
    box = h('input', { type: 'checkbox', id: 'confirm-check' });
    extra.append(h('label', { class: 'check' }, box, ' ', checkbox));
  }
  return new Promise((resolve) => {
    dialog.addEventListener('close', () => {
      if (dialog.returnValue !== 'ok') resolve(false);
      else resolve(box ? { checked: box.checked } : true);
    }, { once: true });
    dialog.returnValue = '';
    dialog.showModal();
    document.getElementById('confirm-cancel').focus();
  });
}

/** "2048" MiB → "2 GiB"; "512" → "512 MiB". */
export function formatRam(mib) {
  if (!mib && mib !== 0) return '';
  return mib >= 1024 && mib % 256 === 0 ? `${+(mib / 1024).toFixed(2)} GiB` : `${mib} MiB`;
}

/** "2G", "512M", "1.5 GiB", "768" (MiB) → MiB, or null when it cannot be read. */
export function parseRamMib(text) {
  const match = String(text).trim().match(/^(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?$/i);
  if (!match) return null;
  const factor = { '': 1, k: 1 / 1024, m: 1, g: 1024, t: 1024 * 1024 }[match[2].toLowerCase()];
  return Math.round(parseFloat(match[1]) * factor);
}

/** A path from a file:// URL (what a file manager puts in text/uri-list when a file is dragged). */
export function pathFromFileUrl(url) {
  try {
    const parsed = new URL(url.trim());
    if (parsed.protocol !== 'file:') return null;
    let path = decodeURIComponent(parsed.pathname);
    if (/^\/[A-Za-z]:\//.test(path)) path = path.slice(1).replaceAll('/', '\\');   // file:///C:/x.iso
    return path;
  } catch (e) {
    return null;
  }
}
