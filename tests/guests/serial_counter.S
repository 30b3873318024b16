/* Prints a 32-bit counter to COM1 as 8 hex digits and a newline, then
 * counts up, forever, with a busy wait between lines. The counter lives in
 * a register, so a VM restored from a snapshot continues the sequence
 * where the snapshot left it, while a fresh boot starts again at 00000000. */
#include "common.h"
	.text
	.globl _start
_start:
	xor %ebx, %ebx
	mov $COM1, %dx
next:
	mov $28, %cl
digit:
	mov %ebx, %eax
	shr %cl, %eax
	and $0xf, %al
	add $'0', %al
	cmp $'9', %al
	jbe 1f
	add $7, %al		/* 'A' - '9' - 1 */
1:	outb %al, %dx
	sub $4, %cl
	jns digit
	mov $'\n', %al
	outb %al, %dx
	inc %ebx
	mov $50000, %ecx
2:	dec %ecx
	jnz 2b
	jmp next
