#include "common.h"
/* Writes to every page of its RAM from 1 MiB up to the highest e820 RAM
 * address (at most the 1 GiB the VMM identity-maps), rewriting each byte
 * with its own value so code, stack and page tables survive; prints how
 * many MiB that reaches, then halts with interrupts off. The host has then
 * had to back the whole of the guest's memory. */
	.text
	.globl _start
_start:
	mov %rsi, %rbx			/* zero page */
	movzbl 0x1e8(%rbx), %ecx	/* e820_entries */
	lea 0x2d0(%rbx), %rsi		/* e820_table: addr, size, type */
	xor %r8, %r8			/* the highest end of RAM */
1:	test %ecx, %ecx
	jz 3f
	cmpl $1, 16(%rsi)
	jne 2f
	mov (%rsi), %rax
	add 8(%rsi), %rax
	cmp %r8, %rax
	jbe 2f
	mov %rax, %r8
2:	add $20, %rsi
	dec %ecx
	jmp 1b
3:	mov $0x40000000, %rax
	cmp %rax, %r8
	jbe 4f
	mov %rax, %r8
4:	mov $0x100000, %rdi
5:	cmp %r8, %rdi
	jae 6f
	movb (%rdi), %al
	movb %al, (%rdi)
	add $4096, %rdi
	jmp 5b
6:	sub $32, %rsp
	lea 31(%rsp), %rdi
	movb $0, (%rdi)
	mov %r8, %rax
	shr $20, %rax
	mov $10, %rcx
7:	xor %edx, %edx
	div %rcx
	add $'0', %dl
	dec %rdi
	mov %dl, (%rdi)
	test %rax, %rax
	jnz 7b
	push %rdi
	lea msg(%rip), %rdi
	call puts
	pop %rdi
	call puts
	lea tail(%rip), %rdi
	call puts
	cli
8:	hlt
	jmp 8b
PUTS_FN
	.section .rodata
msg:	.asciz "kvm-tier: touched RAM up to "
tail:	.asciz " MiB\n"
