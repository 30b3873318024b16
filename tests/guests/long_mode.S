#include "common.h"
/* Checks the state the VMM's 64-bit set-up promises, then prints the
 * command line it finds through the zero page, then resets. */
	.text
	.globl _start
_start:
	mov %rsi, %rbx			/* zero page */
	mov $0xc0000080, %ecx		/* EFER */
	rdmsr
	bt $10, %eax			/* LMA */
	jnc fail_efer
	mov %cr0, %rax
	bt $31, %rax			/* PG */
	jnc fail_cr0
	mov %cr4, %rax
	bt $5, %rax			/* PAE */
	jnc fail_cr4
	cmpl $0x53726448, 0x202(%rbx)	/* "HdrS" */
	jne fail_hdr
	cmpb $0xff, 0x210(%rbx)		/* type_of_loader */
	jne fail_hdr
	/* A 64-bit-only instruction: fails to decode outside long mode. */
	movabs $0x1122334455667788, %rax
	shr $32, %rax
	cmp $0x11223344, %eax
	jne fail_cr0
	lea ok(%rip), %rdi
	call puts
	mov 0x228(%rbx), %edi		/* cmd_line_ptr */
	call puts
	lea nl(%rip), %rdi
	call puts
	RESET
fail_efer:
	lea m_efer(%rip), %rdi
	jmp fail
fail_cr0:
	lea m_cr0(%rip), %rdi
	jmp fail
fail_cr4:
	lea m_cr4(%rip), %rdi
	jmp fail
fail_hdr:
	lea m_hdr(%rip), %rdi
fail:
	call puts
	RESET
PUTS_FN
	.section .rodata
ok:	.asciz "kvm-tier: long mode ok, cmdline: "
nl:	.asciz "\n"
m_efer:	.asciz "kvm-tier: FAIL EFER.LMA clear\n"
m_cr0:	.asciz "kvm-tier: FAIL paging or 64-bit decode\n"
m_cr4:	.asciz "kvm-tier: FAIL CR4.PAE clear\n"
m_hdr:	.asciz "kvm-tier: FAIL zero page header\n"
