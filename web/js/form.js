/**
 * The create / edit form of a VM.
 *
 * Create sends POST /api/vms (CreateOptions: human units, paths as typed); edit sends only the
 * changed vm.json fields with PATCH /api/vms/{id}. An API error is shown next to the field it
 * names (`field`), or above the buttons when it names none. Files come from the window's native
 * dialog (window.pywebview.api.pick_file) when there is one, else from a typed path; a file
 * dropped on the window fills the ISO or disk field (see `usePath`).
 *
 * Example:
 *   const form = renderVmForm(main, { vm: null, onDone: (vm) => show(vm.id), onCancel: back });
 *   form.usePath('/home/me/debian.iso');
 */
import * as api from './api.js';
import { confirmAction, h, parseRamMib, toast } from './ui.js';

const OS_CHOICES = [['linux', 'Linux'], ['windows', 'Windows (10 or older)'], ['windows11', 'Windows 11'],
                    ['bsd', 'BSD'], ['other', 'Other']];
const FIRMWARE_CHOICES = [['uefi', 'UEFI'], ['uefi-secure', 'UEFI with Secure Boot'], ['bios', 'BIOS (legacy)']];
const TPM_CHOICES = [['auto', 'Automatic (when the host can)'], ['on', 'Required'], ['off', 'None'],
                     ['native', 'Native swtpm'], ['helper', 'Helper VM']];
const DISPLAY_CHOICES = [['vnc', 'Embedded screen (in this window)'], ['native', "QEMU's own window"],
                         ['none', 'None (serial console only)']];
const NETWORK_CHOICES = [['user', 'NAT (internet access)'], ['restricted', 'NAT without internet (host only)'],
                         ['none', 'No network']];
const MACHINE_CHOICES = [['q35', 'q35 (modern)'], ['pc', 'pc / i440fx (older guests)']];
const ACCEL_CHOICES = [['auto', 'Automatic'], ['kvm', 'KVM'], ['whpx', 'Hyper-V (WHPX)'], ['hvf', 'Hypervisor.framework'],
                       ['haxm', 'HAXM'], ['tcg', 'TCG (emulation, slow)']];
const BOOT_CHOICES = [['', 'Automatic (CD, then disk)'], ['cdrom,disk', 'CD, then disk'], ['disk,cdrom', 'Disk, then CD'],
                      ['disk', 'Disk only'], ['cdrom', 'CD only'], ['network', 'Network (PXE)']];
const DISK_BUSES = [['virtio', 'virtio (fast; Linux has drivers)'], ['sata', 'SATA'], ['nvme', 'NVMe'], ['scsi', 'SCSI'],
                    ['ide', 'IDE']];
const NIC_MODELS = [['virtio-net-pci', 'virtio-net'], ['e1000e', 'Intel e1000e'], ['e1000', 'Intel e1000'],
                    ['rtl8139', 'Realtek 8139']];
const DISK_SUFFIXES = /\.(qcow2|vmdk|vdi|vhdx?|raw)$/i;

const select = (id, choices, value) =>
  h('select', { id, name: id }, choices.map(([v, label]) => h('option', { value: v, selected: v === value }, label)));

/** A labelled field with a place for its error underneath; `key` is what API errors are matched on. */
function field(key, label, control, hint = null) {
  return h('div', { class: 'field', dataset: { field: key } },
    h('label', { for: control.id || undefined, class: 'field-label' }, label),
    control,
    hint ? h('p', { class: 'hint' }, hint) : null,
    h('p', { class: 'field-error', role: 'alert', hidden: true }));
}

/** Which form field an API error belongs to (`cdroms[0].path` → iso, `nics[0].forwards[1]` → forwards…). */
export function fieldKey(apiField) {
  const name = apiField || '';
  if (name === 'iso' || name.startsWith('cdroms')) return 'iso';
  if (name.includes('forwards')) return 'forwards';
  if (name === 'disk_bus' || /^disks\[\d+\]\.bus$/.test(name)) return 'disk_bus';
  if (name.startsWith('disk')) return 'disk';
  if (name.startsWith('nics')) return 'network';
  if (name === 'ram' || name === 'ram_mib') return 'ram';
  if (name.startsWith('display')) return 'display';
  if (name.startsWith('boot')) return 'boot';
  return name;
}

function suggestName(path) {
  const stem = path.split(/[\\/]/).pop().replace(/\.[^.]+$/, '');
  let name = stem.replace(/[^A-Za-z0-9 ._-]+/g, '-').replace(/^[^A-Za-z0-9]+/, '').slice(0, 40);
  return name.replace(/[. ]+$/, '');
}

function guessOs(path) {
  const base = path.split(/[\\/]/).pop().toLowerCase();
  if (/win(dows)?[ _-]?11/.test(base)) return 'windows11';
  if (/win/.test(base)) return 'windows';
  if (/bsd/.test(base)) return 'bsd';
  return null;
}

/** MiB as the field shows it: 2048 → "2G", 768 → "768M". */
const ramText = (mib) => (mib % 1024 === 0 ? `${mib / 1024}G` : `${mib}M`);

function bridge() {
  return window.pywebview?.api?.pick_file ? window.pywebview.api : null;
}

export function renderVmForm(container, { vm = null, onDone, onCancel, initialPath = null }) {
  const editing = vm !== null;
  const nic = vm?.nics?.[0] || null;
  const cdrom = vm?.cdroms?.[0] || null;

  const name = h('input', { id: 'name', name: 'name', type: 'text', value: vm?.name || '', autocomplete: 'off',
                             placeholder: 'e.g. debian', maxlength: 64, required: true });
  const os = select('os', OS_CHOICES, vm?.os || 'linux');
  const iso = h('input', { id: 'iso', name: 'iso', type: 'text', value: cdrom?.path || '', list: 'iso-choices',
                            placeholder: 'full path of the installer ISO, e.g. /home/me/Downloads/debian.iso',
                            autocomplete: 'off' });
  const isoChoices = h('datalist', { id: 'iso-choices' });
  const pickIso = h('button', { type: 'button', class: 'needs-bridge', id: 'pick-iso' }, 'Browse…');
  const clearIso = h('button', { type: 'button', id: 'clear-iso', title: 'Empty the CD drive' }, 'Clear');

  // Disk: only chosen at creation; an existing VM lists its disks.
  const diskMode = vm ? null : h('div', { class: 'segmented', role: 'radiogroup', id: 'disk-mode' },
    [['new', 'New disk'], ['existing', 'Existing image'], ['none', 'No disk']].map(([value, label]) =>
      h('label', {}, h('input', { type: 'radio', name: 'disk-mode', value, checked: value === 'new' }), ' ', label)));
  const diskSize = h('input', { id: 'disk-size', type: 'text', value: '20G', size: 8, placeholder: '20G' });
  const diskFormat = select('disk-format', [['qcow2', 'qcow2 (grows as used, snapshots)'], ['raw', 'raw (fixed, fastest)']],
                            'qcow2');
  const diskPath = h('input', { id: 'disk-path', type: 'text', placeholder: 'full path of a .qcow2, .img or .raw image',
                                 autocomplete: 'off' });
  const pickDisk = h('button', { type: 'button', class: 'needs-bridge', id: 'pick-disk' }, 'Browse…');
  const diskNew = h('div', { class: 'row', id: 'disk-new' }, h('label', {}, 'Size ', diskSize), h('label', {}, 'Format ', diskFormat));
  const diskExisting = h('div', { class: 'row', id: 'disk-existing', hidden: true }, diskPath, pickDisk);
  const diskBus = select('disk_bus', DISK_BUSES, vm?.disks?.[0]?.bus || 'virtio');
  if (!vm) {
    // Windows Setup has no virtio driver: follow the OS choice until the user picks a bus by hand.
    let busTouched = false;
    diskBus.addEventListener('change', () => { busTouched = true; });
    os.addEventListener('change', () => {
      if (!busTouched) diskBus.value = os.value.startsWith('windows') ? 'sata' : 'virtio';
    });
  }

  const ram = h('input', { id: 'ram', name: 'ram', type: 'text', value: vm ? ramText(vm.ram_mib) : '2G',
                            size: 8, placeholder: '2G' });
  const cpus = h('input', { id: 'cpus', name: 'cpus', type: 'number', min: 1, max: 255, value: vm?.cpus ?? 2 });
  const firmware = select('firmware', FIRMWARE_CHOICES, vm?.firmware || 'uefi');
  const tpm = select('tpm', TPM_CHOICES, vm?.tpm || 'auto');
  // "Windows 11 setup" (new VMs, OS Windows 11): an answer-file drive that lets Setup skip its TPM,
  // Secure Boot and RAM checks; on by default where the host cannot emulate a TPM (GET /api/win11-setup).
  const win11 = editing ? null : h('input', { type: 'checkbox', id: 'win11_setup', name: 'win11_setup' });
  const win11Why = h('p', { class: 'hint', id: 'win11-why' });
  const win11Field = editing ? null : field('win11_setup', 'Windows 11 setup', h('div', {},
    h('label', { class: 'check' }, win11, ' Let Windows 11 Setup skip its TPM, Secure Boot and RAM checks'), win11Why));
  if (win11Field) win11Field.hidden = true;
  // Resetting the UEFI variables (settings of a stopped UEFI VM): POST /api/vms/{id}/firmware/reset.
  const running = editing && !['stopped', 'crashed'].includes(vm.state);
  const resetFirmware = editing ? h('button', { type: 'button', id: 'reset-firmware', disabled: running },
                                    'Reset firmware settings') : null;
  const resetNote = h('p', { class: 'hint', id: 'reset-firmware-note' }, running
    ? 'Shut the VM down to reset its firmware settings.'
    : 'Forgets the UEFI boot entries, enrolled Secure Boot keys and firmware settings; the next start begins ' +
      'from the firmware’s defaults. The disks are not touched.');
  const display = select('display', DISPLAY_CHOICES, vm?.display?.kind || 'vnc');
  const network = select('network', NETWORK_CHOICES, nic?.mode || (vm && !nic ? 'none' : 'user'));
  const nicModel = select('nic_model', NIC_MODELS, nic?.model || 'virtio-net-pci');
  const machine = select('machine', MACHINE_CHOICES, vm?.machine || 'q35');
  const accel = select('accel', ACCEL_CHOICES, vm?.accel || 'auto');
  const bootNow = vm ? vm.boot_order.join(',') : '';
  const boot = select('boot', BOOT_CHOICES.some(([v]) => v === bootNow) ? BOOT_CHOICES
                                                                        : [...BOOT_CHOICES, [bootNow, bootNow]], bootNow);

  const forwardRows = h('div', { class: 'forwards', id: 'forwards' });
  const addForward = (forward = { protocol: 'tcp', host_port: '', guest_port: '', host_address: '127.0.0.1' }) => {
    const protocol = select('', [['tcp', 'TCP'], ['udp', 'UDP']], forward.protocol);
    const hostPort = h('input', { type: 'number', min: 1, max: 65535, class: 'host-port', value: forward.host_port,
                                   placeholder: 'host port', 'aria-label': 'Host port' });
    const guestPort = h('input', { type: 'number', min: 1, max: 65535, class: 'guest-port', value: forward.guest_port,
                                    placeholder: 'guest port', 'aria-label': 'Guest port' });
    const row = h('div', { class: 'forward-row' }, protocol,
      h('span', { class: 'muted' }, `${forward.host_address || '127.0.0.1'} :`), hostPort,
      h('span', { class: 'muted', 'aria-hidden': 'true' }, '→ guest :'), guestPort,
      h('button', { type: 'button', class: 'icon', title: 'Remove this forward', 'aria-label': 'Remove this forward',
                    onclick: () => row.remove() }, '✕'));
    row.forward = () => ({ protocol: protocol.value, host_address: forward.host_address || '127.0.0.1',
                           host_port: hostPort.value.trim(), guest_port: guestPort.value.trim() });
    forwardRows.append(row);
    return row;
  };
  for (const forward of nic?.forwards || []) addForward(forward);
  const addForwardButton = h('button', { type: 'button', id: 'add-forward', onclick: () => addForward().querySelector('.host-port').focus() },
                             '+ Add port forward');

  const formError = h('div', { class: 'form-error', role: 'alert', hidden: true, id: 'form-error' });
  const submit = h('button', { type: 'submit', class: 'primary', id: 'save' }, editing ? 'Save changes' : 'Create VM');
  const cancel = h('button', { type: 'button', id: 'cancel', onclick: () => onCancel?.() }, 'Cancel');

  const disksList = vm ? h('ul', { class: 'disk-list' }, vm.disks.length
    ? vm.disks.map((disk) => h('li', {}, h('code', {}, disk.path), ` — ${disk.format}, ${disk.bus}`))
    : h('li', { class: 'muted' }, 'No disks')) : null;

  const form = h('form', { class: 'vm-form', id: 'vm-form', novalidate: true },
    h('h1', {}, editing ? `Settings of ${vm.name}` : 'New virtual machine'),
    editing ? h('p', { class: 'hint' }, 'Changes apply at the next start.') :
      h('p', { class: 'hint' }, 'Pick an installer ISO — or drop one onto this window — and choose how big the VM is. ' +
                                'Everything else has sensible defaults.'),
    h('fieldset', {}, h('legend', {}, 'Basics'),
      field('name', 'Name', name),
      field('os', 'Operating system', os, 'Tunes defaults such as the TPM and clock for this kind of guest.'),
      win11Field,
      field('iso', 'Installer ISO (CD drive)', h('div', { class: 'row' }, iso, pickIso, clearIso, isoChoices),
            bridge() ? null : 'Type the full path, or drag the file from your file manager onto this window.')),
    h('fieldset', {}, h('legend', {}, 'Disk'),
      vm ? field('disk', 'Disks', disksList)
         : field('disk', 'System disk', h('div', {}, diskMode, diskNew, diskExisting))),
    h('fieldset', {}, h('legend', {}, 'Hardware'),
      h('div', { class: 'grid2' },
        field('ram', 'Memory (RAM)', ram, 'e.g. 2G, 4G, 512M'),
        field('cpus', 'Virtual CPUs', cpus)),
      h('div', { class: 'grid2' },
        field('firmware', 'Firmware', firmware),
        field('tpm', 'TPM (security chip)', tpm, 'Windows 11 needs one.')),
      editing && vm.firmware !== 'bios'
        ? field('firmware_reset', 'Firmware settings (UEFI variables)', h('div', {}, resetFirmware, resetNote)) : null,
      field('display', 'Screen', display)),
    h('fieldset', {}, h('legend', {}, 'Network'),
      field('network', 'Connection', network),
      field('forwards', 'Port forwards (host → guest)', h('div', {}, forwardRows, addForwardButton),
            'Reach a service in the guest from this computer, e.g. host 2222 → guest 22 for SSH.')),
    h('details', { class: 'advanced' }, h('summary', {}, 'Advanced'),
      h('div', { class: 'grid2' },
        field('machine', 'Machine type', machine),
        field('accel', 'Accelerator', accel)),
      h('div', { class: 'grid2' },
        field('boot', 'Boot order', boot),
        field('disk_bus', vm ? 'Disk bus (all disks)' : 'Disk bus', diskBus)),
      field('nic_model', 'Network card', nicModel)),
    formError,
    h('div', { class: 'form-buttons' }, cancel, submit));

  container.replaceChildren(form);

  // -- behaviour -----------------------------------------------------------------------------------
  const diskModeValue = () => form.querySelector('input[name="disk-mode"]:checked')?.value || 'new';
  form.addEventListener('change', (event) => {
    if (event.target.name === 'disk-mode') {
      diskNew.hidden = diskModeValue() !== 'new';
      diskExisting.hidden = diskModeValue() !== 'existing';
    }
  });
  clearIso.addEventListener('click', () => { iso.value = ''; iso.focus(); });
  let win11Known = false;
  const updateWin11 = () => { if (win11Field) win11Field.hidden = os.value !== 'windows11'; };
  if (win11) {
    win11.addEventListener('change', () => { win11Known = true; });
    form.addEventListener('change', updateWin11);
    setTimeout(updateWin11, 0);   // after a catalog preset has filled the form in
    api.win11Setup().then((info) => {
      if (!win11Known) win11.checked = info.default;
      win11Known = true;
      win11Why.textContent = info.tpm_emulation
        ? `${info.about} This host can emulate a TPM, so it is only needed when the VM’s TPM is off.`
        : `This host cannot emulate a TPM (${info.reason}), so Windows 11 Setup would stop at its hardware check. ` +
          info.about;
    }).catch(() => {});
  }
  resetFirmware?.addEventListener('click', async () => {
    const sure = await confirmAction({
      title: `Reset the firmware settings of ${vm.name}?`, ok: 'Reset',
      text: 'The VM forgets its UEFI boot entries, enrolled Secure Boot keys and firmware settings; the next start ' +
            'begins from the firmware’s defaults. The old settings are kept as vars.qcow2.prev. The disks are not touched.' });
    if (!sure) return;
    resetFirmware.disabled = true;
    try {
      const result = await api.resetFirmware(vm.id);
      resetNote.textContent = result.note.charAt(0).toUpperCase() + result.note.slice(1) + '.';
      toast(`${vm.name}: ${result.note}`, 'ok');
    } catch (error) {
      showError('firmware_reset', error.message);
    } finally {
      resetFirmware.disabled = false;
    }
  });
  let nameTouched = editing;
  name.addEventListener('input', () => { nameTouched = true; });

  const useIso = (path) => {
    iso.value = path;
    if (!nameTouched && !name.value) name.value = suggestName(path);
    const guessed = guessOs(path);
    if (guessed && !editing) {
      os.value = guessed;
      updateWin11();
      if (guessed === 'windows11') { firmware.value = 'uefi-secure'; tpm.value = 'auto'; }
    }
  };
  const useDisk = (path) => {
    if (editing) return false;
    form.querySelector('input[name="disk-mode"][value="existing"]').checked = true;
    form.dispatchEvent(new Event('change'));
    diskNew.hidden = true;
    diskExisting.hidden = false;
    diskPath.value = path;
    return true;
  };
  pickIso.addEventListener('click', async () => {
    const chosen = await bridge()?.pick_file('iso');
    if (chosen) useIso(chosen);
  });
  pickDisk.addEventListener('click', async () => {
    const chosen = await bridge()?.pick_file('disk');
    if (chosen) diskPath.value = chosen;
  });
  api.listIsos().then((isos) => {
    isoChoices.replaceChildren(...isos.filter((item) => item.exists)
      .map((item) => h('option', { value: item.full_path || item.path }, item.name)));
  }).catch(() => {});

  const clearErrors = () => {
    for (const box of form.querySelectorAll('.field-error')) { box.hidden = true; box.textContent = ''; }
    for (const wrap of form.querySelectorAll('.field.invalid')) wrap.classList.remove('invalid');
    formError.hidden = true;
  };
  const showError = (apiField, message) => {
    const key = fieldKey(apiField);
    const wrap = key ? form.querySelector(`.field[data-field="${CSS.escape(key)}"]`) : null;
    if (!wrap) {
      formError.textContent = message;
      formError.hidden = false;
      formError.scrollIntoView({ block: 'nearest' });
      return;
    }
    const box = wrap.querySelector('.field-error');
    // Next to its field the message needs no "forwards.host_port: " in front.
    box.textContent = message.replace(/^[a-z_]+(?:\[\d+\])?(?:\.[a-z_]+(?:\[\d+\])?)*: /, '');
    box.hidden = false;
    wrap.classList.add('invalid');
    if (wrap.closest('details')) wrap.closest('details').open = true;
    wrap.scrollIntoView({ block: 'nearest' });
    wrap.querySelector('input, select')?.focus();
  };

  const forwards = () => [...forwardRows.children].map((row) => row.forward())
    .filter((f) => f.host_port || f.guest_port);

  const createBody = () => {
    const count = Number.parseInt(cpus.value, 10);
    if (!Number.isInteger(count)) throw Object.assign(new Error('Give the number of virtual CPUs, e.g. 2'), { field: 'cpus' });
    const body = { name: name.value.trim(), os: os.value, iso: iso.value.trim() || null, ram: ram.value.trim(), cpus: count,
                   firmware: firmware.value, tpm: tpm.value, display: display.value, machine: machine.value,
                   accel: accel.value, disk_bus: diskBus.value,
                   forwards: forwards().map((f) => `${f.protocol}:${f.host_port}:${f.guest_port}`) };
    const mode = diskModeValue();
    if (mode === 'new') {
      body.disk = diskSize.value.trim();
      body.disk_format = diskFormat.value;
      if (!body.disk) throw Object.assign(new Error('Give the new disk a size, e.g. 20G'), { field: 'disk' });
    } else if (mode === 'existing') {
      body.disk = diskPath.value.trim();
      if (!body.disk) throw Object.assign(new Error('Give the full path of the disk image'), { field: 'disk' });
    } else {
      body.disk = '';   // explicitly none: an ISO from the catalog would otherwise bring its default disk
    }
    if (boot.value) body.boot = boot.value.split(',');
    if (os.value === 'windows11' && win11Known) body.win11_setup = win11.checked;
    if (network.value === 'none' && body.forwards.length) {
      throw Object.assign(new Error('A VM without network cannot forward ports; remove the forwards or pick NAT'),
                          { field: 'forwards' });
    }
    return body;
  };

  const editBody = () => {
    const ramMib = parseRamMib(ram.value);
    if (ramMib === null) throw Object.assign(new Error(`"${ram.value}" is not an amount of memory; write e.g. 2G or 512M`),
                                             { field: 'ram' });
    const count = Number.parseInt(cpus.value, 10);
    if (!Number.isInteger(count)) throw Object.assign(new Error('Give the number of virtual CPUs, e.g. 2'), { field: 'cpus' });
    const portList = forwards().map((f) => ({ protocol: f.protocol, host_address: f.host_address,
                                              host_port: Number(f.host_port), guest_port: Number(f.guest_port) }));
    for (const f of portList) {
      if (!Number.isInteger(f.host_port) || !Number.isInteger(f.guest_port) || f.host_port < 1 || f.guest_port < 1) {
        throw Object.assign(new Error('Each forward needs a host port and a guest port (1-65535)'), { field: 'forwards' });
      }
    }
    const isoPath = iso.value.trim();
    let cdroms = vm.cdroms;
    if (cdroms.length) cdroms = [{ ...cdroms[0], path: isoPath }, ...cdroms.slice(1)];
    else if (isoPath) cdroms = [{ path: isoPath }];
    let nics = vm.nics;
    if (network.value === 'none' && !portList.length) {
      nics = nics.length ? [{ ...nics[0], mode: 'none', forwards: [] }, ...nics.slice(1)] : [];
    } else if (nics.length) {
      nics = [{ ...nics[0], mode: network.value, model: nicModel.value, forwards: portList }, ...nics.slice(1)];
    } else {
      nics = [{ mode: network.value, model: nicModel.value, forwards: portList }];
    }
    const wanted = {
      name: name.value.trim(), os: os.value, ram_mib: ramMib, cpus: count, firmware: firmware.value, tpm: tpm.value,
      machine: machine.value, accel: accel.value, display: { ...vm.display, kind: display.value },
      boot_order: boot.value ? boot.value.split(',') : vm.boot_order, cdroms, nics,
      disks: vm.disks.map((disk) => ({ ...disk, bus: diskBus.value })),
    };
    const changes = {};
    for (const [key, value] of Object.entries(wanted)) {
      if (JSON.stringify(value) !== JSON.stringify(vm[key])) changes[key] = value;
    }
    return changes;
  };

  form.addEventListener('submit', async (event) => {
    event.preventDefault();
    clearErrors();
    let body;
    try {
      body = editing ? editBody() : createBody();
    } catch (error) {
      showError(error.field, error.message);
      return;
    }
    if (editing && !Object.keys(body).length) {
      onDone?.(vm);
      return;
    }
    submit.disabled = true;
    submit.textContent = editing ? 'Saving…' : 'Creating…';
    try {
      let result = editing ? await api.editVm(vm.id, body) : await api.createVm(body);
      if (!editing && (network.value !== 'user' || nicModel.value !== 'virtio-net-pci') && result.nics.length) {
        // CreateOptions has no network mode or card model; set them on the new VM straight away.
        result = await api.editVm(result.id, { nics: [{ ...result.nics[0], mode: network.value, model: nicModel.value,
                                                        forwards: network.value === 'none' ? [] : result.nics[0].forwards }] });
      }
      onDone?.(result);
    } catch (error) {
      showError(error.field, error.message);
    } finally {
      submit.disabled = false;
      submit.textContent = editing ? 'Save changes' : 'Create VM';
    }
  });

  if (initialPath) usePath(initialPath);
  (editing ? name : (initialPath ? name : iso)).focus();

  function usePath(path) {
    if (DISK_SUFFIXES.test(path) && useDisk(path)) return 'disk';
    useIso(path);
    return 'iso';
  }
  return { usePath, element: form };
}
