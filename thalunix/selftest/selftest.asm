; Thalunix accelerator self-test guest: one 512-byte boot sector.
;
; SeaBIOS loads it at 0x7c00 in real mode. It walks through the CPU features a
; real guest OS needs from the accelerator (real mode, paging, long mode, x87,
; SSE), printing one progress letter per stage on COM1 so a failure can be
; located, and finally reports to QEMU's isa-debug-exit device at port 0xf4,
; which makes QEMU exit with status (value << 1) | 1.
;
; Serial transcript on success: "TLX:RLFSOK\r\n"
;   R = real mode running, L = 64-bit code running, F = x87 result right,
;   S = SSE result right, OK = about to signal success.
; Exit values (Python side: thalunix/selftest/__init__.py):
;   0x21 success (QEMU status 67), 0x01 no long mode (3),
;   0x02 x87 result wrong (5), 0x03 SSE result wrong (7).
; A CPU exception has no handler here, so it triple-faults: with -no-reboot
; QEMU then exits with status 0, and the last letter tells how far it got.
;
; Regenerate the embedded bytes after editing (see thalunix/selftest/__init__.py):
;   nasm -f bin -o selftest.bin selftest.asm

%define COM1        0x3f8
%define DEBUG_EXIT  0xf4
%define PML4        0x1000      ; page tables live in free low memory below the sector
%define PDPT        0x2000
%define PD          0x3000
%define EXIT_OK     0x21
%define EXIT_NOLM   0x01
%define EXIT_X87    0x02
%define EXIT_SSE    0x03

        org 0x7c00
        bits 16

start:
        cli
        xor ax, ax
        mov ds, ax
        mov es, ax
        mov ss, ax
        mov sp, 0x7c00
        ; SeaBIOS may enter with CS=0x07c0: normalise so absolute labels work.
        jmp 0x0000:real_start

real_start:
        mov si, msg_hello
        call print16

        ; Long mode needs CPUID leaf 0x80000001 EDX bit 29; bail out clearly if absent.
        mov eax, 0x80000000
        cpuid
        cmp eax, 0x80000001
        jb no_long_mode
        mov eax, 0x80000001
        cpuid
        test edx, 1 << 29
        jz no_long_mode

        ; Fast A20 gate: SeaBIOS usually enables it, but do not rely on that.
        in al, 0x92
        or al, 2
        and al, 0xfe
        out 0x92, al

        ; Identity-map the first 2 MiB with one large page.
        mov di, PML4
        mov cx, (PD + 0x1000 - PML4) / 4
        xor eax, eax
        cld
        rep stosd
        mov word [PML4], PDPT | 3
        mov word [PDPT], PD | 3
        mov word [PD], 0x83            ; present, writable, 2 MiB page

        mov eax, cr4
        or eax, (1 << 5) | (1 << 9) | (1 << 10)    ; PAE, OSFXSR, OSXMMEXCPT
        mov cr4, eax
        mov eax, PML4
        mov cr3, eax
        mov ecx, 0xc0000080            ; EFER
        rdmsr
        or ax, 1 << 8                  ; LME
        wrmsr
        mov eax, cr0
        and al, ~(1 << 2)              ; EM off, so x87/SSE run instead of trapping
        or eax, 0x80000003             ; PG, MP, PE
        mov cr0, eax
        lgdt [gdt_desc]
        jmp 0x08:long_mode

no_long_mode:
        mov al, EXIT_NOLM
        out DEBUG_EXIT, al
        jmp halt16

; Print the zero-terminated string at DS:SI on COM1 (QEMU needs no UART setup).
print16:
        mov dx, COM1
.next:
        lodsb
        test al, al
        jz .done
        out dx, al
        jmp .next
.done:
        ret

halt16:
        hlt
        jmp halt16

        bits 64
long_mode:
        mov ax, 0x10
        mov ds, ax
        mov es, ax
        mov ss, ax
        mov rsp, 0x7c00
        mov al, 'L'
        call putc64

        ; x87: 1 + 1 via the FPU stack, then sqrt(16) = 4.
        fninit
        fld1
        fld1
        faddp
        fistp dword [scratch]
        cmp dword [scratch], 2
        jne bad_x87
        fild dword [sixteen]
        fsqrt
        fistp dword [scratch]
        cmp dword [scratch], 4
        jne bad_x87
        mov al, 'F'
        call putc64

        ; SSE2: 1.5 * 4 = 6 in double precision.
        mov rax, 0x3ff8000000000000    ; 1.5
        movq xmm0, rax
        cvtsi2sd xmm1, dword [sixteen]
        sqrtsd xmm1, xmm1              ; 4.0
        mulsd xmm0, xmm1
        cvttsd2si eax, xmm0
        cmp eax, 6
        jne bad_sse
        mov al, 'S'
        call putc64

        mov al, 'O'
        call putc64
        mov al, 'K'
        call putc64
        mov al, 13
        call putc64
        mov al, 10
        call putc64
        mov al, EXIT_OK
        jmp exit64

bad_x87:
        mov al, EXIT_X87
        jmp exit64
bad_sse:
        mov al, EXIT_SSE
exit64:
        out DEBUG_EXIT, al
        ; Only reached without the debug-exit device: park the CPU.
.halt:
        hlt
        jmp .halt

putc64:
        mov dx, COM1
        out dx, al
        ret

        align 8
gdt:
        dq 0                           ; null descriptor
        dq 0x00af9a000000ffff          ; 0x08: 64-bit code
        dq 0x00cf92000000ffff          ; 0x10: data
gdt_desc:
        dw gdt_desc - gdt - 1
        dd gdt

sixteen:
        dd 16
scratch:
        dd 0
msg_hello:
        db "TLX:R", 0

        times 510 - ($ - $$) db 0
        dw 0xaa55
