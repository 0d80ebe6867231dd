/*
 * CPU and memory hog for the nested stress run: keeps rewriting one byte
 * of every page of a buffer of the given size (MiB), so the nested host's
 * CPUs stay busy and its memory stays in use beside the microVMs.
 */
#include <stdio.h>
#include <stdlib.h>

int main(int argc, char **argv)
{
	size_t mib = argc > 1 ? strtoul(argv[1], NULL, 10) : 0;
	if (mib == 0) {
		fputs("usage: hog MIB\n", stderr);
		return 2;
	}
	size_t size = mib << 20;
	volatile unsigned char *buffer = malloc(size);
	if (buffer == NULL) {
		perror("hog: malloc");
		return 1;
	}
	for (unsigned char round = 0;; round++)
		for (size_t offset = 0; offset < size; offset += 4096)
			buffer[offset] = round;
}
