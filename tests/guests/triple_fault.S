/* Loads an empty IDT and raises #UD: the exception cannot be delivered,
 * nor the double fault after it, so the CPU shuts down (triple fault). */
	.text
	.globl _start
_start:
	lidt idt_empty(%rip)
	ud2
	.section .rodata
idt_empty:
	.word 0
	.quad 0
