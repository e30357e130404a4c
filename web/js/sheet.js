/**
 * A modal dialog built on the fly (<dialog>, Escape closes it), for forms that run an operation and then
 * show its progress in place: clone, export, import, add and grow a disk, take a snapshot.
 *
 * Fields carry their API field name (`data-field`), so an API error (`error.field`) is shown under the
 * field it names, or above the buttons when it names none.
 *
 * Example:
 *   const sheet = openSheet({ id: 'clone-dialog', title: 'Clone web', body: [nameField], submit: 'Clone',
 *                             onSubmit: async () => { … } });
 *   sheet.showError(error);        // next to error.field
 *   sheet.close();
 */
import { h } from './ui.js';

/** A labelled input with its error line; `key` is the API field it stands for. */
export function field(key, label, control, hint = null) {
  return h('div', { class: 'field', dataset: { field: key } },
    h('label', { class: 'field-label', for: control.id || undefined }, label),
    control,
    hint ? h('p', { class: 'hint' }, hint) : null,
    h('p', { class: 'field-error', role: 'alert', hidden: true }));
}

/** Radio buttons: [[value, label, description], …]; the checked one is `value`. */
export function choices(name, options, value) {
  return h('div', { class: 'choice-list', role: 'radiogroup' }, options.map(([v, label, text]) =>
    h('label', { class: 'choice' },
      h('input', { type: 'radio', name, value: v, id: `${name}-${v}`, checked: v === value }),
      h('span', {}, h('strong', {}, label), text ? h('span', { class: 'hint choice-text' }, text) : null))));
}

export function chosen(root, name) {
  return root.querySelector(`input[name="${name}"]:checked`)?.value ?? null;
}

/** 8589934592 → "8 GiB", 1610612736 → "1.5 GiB" (binary units, as qemu-img and the API mean them). */
export function formatBinary(bytes) {
  if (bytes === null || bytes === undefined) return '';
  const units = [['TiB', 2 ** 40], ['GiB', 2 ** 30], ['MiB', 2 ** 20], ['KiB', 2 ** 10]];
  for (const [unit, size] of units) {
    if (bytes >= size) {
      const value = bytes / size;
      return `${Number.isInteger(value) ? value : value.toFixed(1)} ${unit}`;
    }
  }
  return `${bytes} B`;
}

/** The window's native dialogs, when the page runs in the Thalunix window. */
export function bridge() {
  return window.pywebview?.api?.pick_file ? window.pywebview.api : null;
}

export function openSheet({ id, title, intro = null, body = [], submit = 'OK', submitClass = 'primary', onSubmit,
                            onClose = null }) {
  document.getElementById(id)?.remove();
  const error = h('p', { class: 'form-error sheet-error', role: 'alert', hidden: true });
  const ok = h('button', { type: 'submit', class: submitClass, id: `${id}-ok` }, submit);
  const cancel = h('button', { type: 'button', id: `${id}-close`, onclick: () => close() }, 'Cancel');
  const content = h('div', { class: 'sheet-body' }, body);
  const form = h('form', { method: 'dialog', novalidate: true },
    h('h2', {}, title), intro ? h('p', { class: 'sheet-intro' }, intro) : null,
    content, error, h('div', { class: 'dialog-buttons' }, cancel, ok));
  const dialog = h('dialog', { class: 'confirm sheet', id }, form);
  document.body.append(dialog);

  const clearErrors = () => {
    error.hidden = true;
    for (const box of dialog.querySelectorAll('.field-error')) { box.hidden = true; box.textContent = ''; }
    for (const wrap of dialog.querySelectorAll('.field.invalid')) wrap.classList.remove('invalid');
  };
  const sheet = {
    element: dialog, form, content, ok, cancel,
    showError(failure) {
      const wrap = failure.field ? dialog.querySelector(`.field[data-field="${CSS.escape(failure.field)}"]`) : null;
      const box = wrap?.querySelector('.field-error');
      if (box) {
        box.textContent = failure.message;
        box.hidden = false;
        wrap.classList.add('invalid');
        wrap.querySelector('input, select')?.focus();
      } else {
        error.textContent = failure.message;
        error.hidden = false;
      }
    },
    clearErrors,
    /** From now on the sheet shows an operation's progress: the form's controls are done with. */
    running(element) {
      for (const control of content.querySelectorAll('input, select, button')) control.disabled = true;
      ok.hidden = true;
      cancel.textContent = 'Close';
      content.append(element);
    },
    close,
  };
  function close() {
    if (dialog.open) dialog.close();
    dialog.remove();
    onClose?.();
  }
  dialog.addEventListener('cancel', (event) => { event.preventDefault(); close(); });
  // An error is about what was sent: once the field is changed, its message no longer applies.
  dialog.addEventListener('input', (event) => {
    const wrap = event.target.closest?.('.field.invalid');
    if (!wrap) return;
    wrap.classList.remove('invalid');
    const box = wrap.querySelector('.field-error');
    box.hidden = true;
    box.textContent = '';
  });
  form.addEventListener('submit', async (event) => {
    event.preventDefault();
    clearErrors();
    ok.disabled = true;
    try {
      await onSubmit(sheet);
    } catch (failure) {
      sheet.showError(failure);
    } finally {
      ok.disabled = false;
    }
  });
  dialog.showModal();
  (dialog.querySelector('input:not([type="radio"]):not([type="checkbox"])') || ok).focus();
  return sheet;
}
