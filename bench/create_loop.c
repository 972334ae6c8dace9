// SPDX-License-Identifier: GPL-2.0
/* ktel bench workload: open(O_CREAT) an existing file for N seconds, in a tight loop,
 * or paced to R opens a second when a third argument R is given (in steps of 1 ms). */
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

int main(int argc, char **argv)
{
	const char *path = argv[1];
	double seconds = atof(argv[2]);
	double rate = argc > 3 ? atof(argv[3]) : 0;
	struct timespec start, now;
	unsigned long n = 0;

	clock_gettime(CLOCK_MONOTONIC, &start);
	for (;;) {
		double t;

		for (int i = 0; i < 1000; i++) {
			int fd = open(path, O_CREAT | O_WRONLY, 0600);

			if (fd >= 0)
				close(fd);
			n++;
			if (rate > 0 && n % (unsigned long)(rate / 1000 > 1 ? rate / 1000 : 1) == 0)
				break; /* a millisecond's worth: pace below */
		}
		clock_gettime(CLOCK_MONOTONIC, &now);
		t = now.tv_sec - start.tv_sec + (now.tv_nsec - start.tv_nsec) / 1e9;
		if (t >= seconds)
			break;
		if (rate > 0 && n / rate > t) {
			double ahead = n / rate - t;
			struct timespec pause = { (time_t)ahead, (long)((ahead - (time_t)ahead) * 1e9) };

			nanosleep(&pause, NULL);
		}
	}
	printf("%lu\n", n);
	return 0;
}
