/**
 * Light, dark, or follow the system: the choice is kept in localStorage and applied as
 * <html data-theme>; the CSS does the rest. Widgets that paint themselves (the terminal) ask
 * `effectiveTheme()` and subscribe with `onThemeChange`.
 *
 * Example:
 *   initTheme(document.getElementById('theme'));
 *   onThemeChange((mode) => terminal.options.theme = mode === 'dark' ? DARK : LIGHT);
 */

const KEY = 'thalunix-theme';
const CHOICES = ['system', 'light', 'dark'];
const listeners = new Set();
const systemDark = window.matchMedia('(prefers-color-scheme: dark)');

export function storedTheme() {
  try {
    const value = localStorage.getItem(KEY);
    return CHOICES.includes(value) ? value : 'system';
  } catch (e) {
    return 'system';
  }
}

/** What is on screen now: 'light' or 'dark'. */
export function effectiveTheme() {
  const choice = document.documentElement.dataset.theme || 'system';
  if (choice === 'system') return systemDark.matches ? 'dark' : 'light';
  return choice;
}

export function setTheme(choice) {
  if (!CHOICES.includes(choice)) choice = 'system';
  document.documentElement.dataset.theme = choice;
  try { localStorage.setItem(KEY, choice); } catch (e) { /* private mode: only this page keeps it */ }
  notify();
}

export function onThemeChange(listener) {
  listeners.add(listener);
  return () => listeners.delete(listener);
}

function notify() {
  const mode = effectiveTheme();
  for (const listener of listeners) listener(mode);
}

export function initTheme(select) {
  const choice = storedTheme();
  document.documentElement.dataset.theme = choice;
  select.value = choice;
  select.addEventListener('change', () => setTheme(select.value));
  systemDark.addEventListener('change', notify);
}
