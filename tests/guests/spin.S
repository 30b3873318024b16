/* Halts forever with interrupts off: only the VMM's timeout ends it. */
	.text
	.globl _start
_start:
	cli
1:	hlt
	jmp 1b
