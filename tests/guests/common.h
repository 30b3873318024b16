/* Shared helpers for the kvm-tier guests: 64-bit code entered by
 * bulkhead-vmm through the Linux 64-bit boot protocol (long mode, paging on,
 * first GiB identity-mapped, RSI = zero page). */
#define COM1 0x3f8

/* Writes the NUL-terminated string at %rdi to COM1. Clobbers rax, rdx, rdi. */
.macro PUTS_FN
puts:
	mov $COM1, %dx
1:	movb (%rdi), %al
	test %al, %al
	jz 2f
	outb %al, %dx
	inc %rdi
	jmp 1b
2:	ret
.endm

/* Asks the i8042 to reset the CPU, which ends the VMM with status 0. */
.macro RESET
	mov $0xfe, %al
	outb %al, $0x64
	cli
9:	hlt
	jmp 9b
.endm
