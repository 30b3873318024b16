#include "common.h"
/* A hostile virtio-vsock driver: sets the device up (alone on the MMIO
 * bus at 0xd0000000) with an rx queue whose every buffer points far past
 * guest RAM, then keeps the ring full and notifies in a tight loop, with
 * interrupts off. The host then always has a buffer to try and fail. */
#define MMIO 0xd0000000
#define DESC 0x500000
#define AVAIL 0x501000
#define USED 0x502000
#define QSIZE 16
.macro QUEUE n, desc, avail, used
	movl $\n, 0x030(%rbx)
	movl $QSIZE, 0x038(%rbx)
	movl $\desc, 0x080(%rbx)
	movl $0, 0x084(%rbx)
	movl $\avail, 0x090(%rbx)
	movl $0, 0x094(%rbx)
	movl $\used, 0x0a0(%rbx)
	movl $0, 0x0a4(%rbx)
	movl $1, 0x044(%rbx)
.endm
	.text
	.globl _start
_start:
	/* Map the 2 MiB around MMIO (uncached): the VMM maps the first GiB. */
	mov %cr3, %rax
	and $~0xfff, %rax
	mov (%rax), %rax		/* PML4[0] -> PDPT */
	and $~0xfff, %rax
	movq $0x400003, 24(%rax)	/* PDPT[3]: the new PD, present, writable */
	mov $(MMIO + 0x93), %ecx	/* 2 MiB page, PCD, present, writable */
	mov %rcx, 0x400000 + 8 * ((MMIO - 0xc0000000) >> 21)
	mov %cr3, %rax
	mov %rax, %cr3
	mov $MMIO, %rbx
	cmpl $0x74726976, 0x000(%rbx)	/* "virt" */
	jne fail
	cmpl $19, 0x008(%rbx)		/* vsock */
	jne fail
	movl $0, 0x070(%rbx)
	movl $1, 0x070(%rbx)		/* ACKNOWLEDGE */
	movl $3, 0x070(%rbx)		/* DRIVER */
	movl $1, 0x024(%rbx)
	movl $1, 0x020(%rbx)		/* VIRTIO_F_VERSION_1 */
	movl $0, 0x024(%rbx)
	movl $0, 0x020(%rbx)
	movl $0xb, 0x070(%rbx)		/* FEATURES_OK */
	/* Queue 0 (rx) is the flooded one; tx and event stay empty. */
	QUEUE 0, DESC, AVAIL, USED
	QUEUE 1, 0x503000, 0x504000, 0x505000
	QUEUE 2, 0x506000, 0x507000, 0x508000
	movl $0xf, 0x070(%rbx)		/* DRIVER_OK */
	cmpl $0xf, 0x070(%rbx)
	jne fail
	/* Every descriptor: 4 KiB, device-writable, at 128 TiB. */
	mov $DESC, %rdi
	mov $QSIZE, %ecx
	movabs $0x7ffffffff000, %rax
1:	mov %rax, (%rdi)
	movl $4096, 8(%rdi)
	movw $2, 12(%rdi)
	movw $0, 14(%rdi)
	add $16, %rdi
	dec %ecx
	jnz 1b
	lea ok(%rip), %rdi
	call puts
	xor %r9d, %r9d			/* our avail index */
refill:
	movzwl USED + 2, %eax
	mov %r9d, %ecx
	sub %eax, %ecx
	and $0xffff, %ecx
	cmp $QSIZE, %ecx
	jae notify
	mov %r9d, %eax
	and $(QSIZE - 1), %eax
	movw %ax, AVAIL + 4(,%rax,2)
	inc %r9d
	movw %r9w, AVAIL + 2
	jmp refill
notify:
	movl $0, 0x050(%rbx)
	jmp refill
fail:
	lea bad(%rip), %rdi
	call puts
	RESET
PUTS_FN
	.section .rodata
ok:	.asciz "kvm-tier: flooding vsock rx\n"
bad:	.asciz "kvm-tier: FAIL vsock set-up\n"
