/* Writes '.' to COM1 forever, with a short busy wait between characters:
 * the console output grows for as long as the vCPU runs, and only then. */
#include "common.h"
	.text
	.globl _start
_start:
	mov $COM1, %dx
	mov $'.', %al
1:	outb %al, %dx
	mov $10000, %ecx
2:	dec %ecx
	jnz 2b
	jmp 1b
