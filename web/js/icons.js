/**
 * Inline SVG icons for the buttons: no icon font, no emoji (Linux systems often have no emoji font,
 * and WebKitGTK then draws empty boxes). Each icon takes the text colour (currentColor).
 *
 * Example:
 *   button.prepend(icon('play'));
 */

const PATHS = {
  play: '<path d="M4 2.5v11l9-5.5z" fill="currentColor"/>',
  pause: '<path d="M4 2.5h3v11H4zM9 2.5h3v11H9z" fill="currentColor"/>',
  resume: '<path d="M3 2.5h2v11H3zM7 2.5v11l7-5.5z" fill="currentColor"/>',
  power: '<path d="M8 1.5v6M4.6 3.6a5.5 5.5 0 1 0 6.8 0" fill="none" stroke="currentColor" stroke-width="1.7" stroke-linecap="round"/>',
  stop: '<rect x="3" y="3" width="10" height="10" rx="1.5" fill="currentColor"/>',
  reset: '<path d="M13 8a5 5 0 1 1-1.5-3.6M13 2.2v3.3H9.7" fill="none" stroke="currentColor" stroke-width="1.7" stroke-linecap="round" stroke-linejoin="round"/>',
  gear: '<circle cx="8" cy="8" r="2.2" fill="none" stroke="currentColor" stroke-width="1.6"/><path d="M8 1.5v2M8 12.5v2M1.5 8h2M12.5 8h2M3.4 3.4l1.4 1.4M11.2 11.2l1.4 1.4M3.4 12.6l1.4-1.4M11.2 4.8l1.4-1.4" stroke="currentColor" stroke-width="1.6" stroke-linecap="round"/>',
  trash: '<path d="M2.5 4h11M6 4V2.5h4V4M4 4l.7 9.5h6.6L12 4M6.7 6.5v5M9.3 6.5v5" fill="none" stroke="currentColor" stroke-width="1.5" stroke-linecap="round" stroke-linejoin="round"/>',
  screen: '<rect x="1.5" y="2.5" width="13" height="9" rx="1.5" fill="none" stroke="currentColor" stroke-width="1.5"/><path d="M5.5 14h5" stroke="currentColor" stroke-width="1.5" stroke-linecap="round"/>',
};

export function icon(name, size = 14) {
  const wrapper = document.createElement('span');
  wrapper.className = 'icon-svg';
  wrapper.setAttribute('aria-hidden', 'true');
  wrapper.innerHTML = `<svg viewBox="0 0 16 16" width="${size}" height="${size}">${PATHS[name]}</svg>`;
  return wrapper;
}
