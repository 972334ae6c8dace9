// SPDX-License-Identifier: GPL-2.0
/* ktel bench workload: open(O_CREAT) an existing file in a tight loop for N seconds. */
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

int main(int argc, char **argv)
{
	const char *path = argv[1];
	double seconds = atof(argv[2]);
	struct timespec start, now;
	unsigned long n = 0;

	clock_gettime(CLOCK_MONOTONIC, &start);
	for (;;) {
		for (int i = 0; i < 1000; i++) {
			int fd = open(path, O_CREAT | O_WRONLY, 0600);

			if (fd >= 0)
				close(fd);
		}
		n += 1000;
		clock_gettime(CLOCK_MONOTONIC, &now);
		if (now.tv_sec - start.tv_sec + (now.tv_nsec - start.tv_nsec) / 1e9 >= seconds)
			break;
	}
	printf("%lu\n", n);
	return 0;
}
