#include "common.h"
	.text
	.globl _start
_start:
	lea hello(%rip), %rdi
	call puts
	RESET
PUTS_FN
	.section .rodata
hello:	.asciz "kvm-tier: hello from the serial guest\n"
