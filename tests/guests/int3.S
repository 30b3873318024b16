/* Executes int3. On a PVM host KVM's emulator cannot run it, and the VMM
 * must name the instruction; with hardware virtualization it runs, finds
 * no IDT, and the CPU triple-faults. */
	.text
	.globl _start
_start:
	lidt idt_empty(%rip)
	int3
	.section .rodata
idt_empty:
	.word 0
	.quad 0
