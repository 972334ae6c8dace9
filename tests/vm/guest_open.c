// SPDX-License-Identifier: GPL-2.0
/* guest_open.c - opens a file with exact open(2) flags in the qemu guest (filewatcher test). */

/*
 * busybox's shell cannot ask for every flag combination (its noclobber
 * checks with stat() and never opens with O_EXCL), so the VM test builds this
 * statically and runs it in the guest:
 *
 *   guest_open MODE PATH EXPECT
 *
 * MODE   trunc   O_WRONLY|O_CREAT|O_TRUNC       (what "> file" does)
 *        append  O_WRONLY|O_CREAT|O_APPEND      (">> file")
 *        creat   O_WRONLY|O_CREAT
 *        rdcreat O_RDONLY|O_CREAT
 *        excl    O_WRONLY|O_CREAT|O_EXCL
 *        plain   O_RDONLY
 *        creat2  the creat(2) syscall (O_CREAT|O_WRONLY|O_TRUNC)
 * EXPECT ok, or an errno name: EEXIST, ENOENT
 *
 * Exits 0 when the outcome is the expected one, 1 (and says why) otherwise.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

static int mode_flags(const char *mode, int *flags)
{
	static const struct {
		const char *name;
		int flags;
	} modes[] = {
		{ "trunc", O_WRONLY | O_CREAT | O_TRUNC },
		{ "append", O_WRONLY | O_CREAT | O_APPEND },
		{ "creat", O_WRONLY | O_CREAT },
		{ "rdcreat", O_RDONLY | O_CREAT },
		{ "excl", O_WRONLY | O_CREAT | O_EXCL },
		{ "plain", O_RDONLY },
	};
	size_t i;

	for (i = 0; i < sizeof(modes) / sizeof(modes[0]); i++) {
		if (!strcmp(mode, modes[i].name)) {
			*flags = modes[i].flags;
			return 0;
		}
	}
	return -1;
}

static int expected_errno(const char *expect)
{
	if (!strcmp(expect, "ok"))
		return 0;
	if (!strcmp(expect, "EEXIST"))
		return EEXIST;
	if (!strcmp(expect, "ENOENT"))
		return ENOENT;
	return -1;
}

int main(int argc, char **argv)
{
	int flags = 0, want, got, fd;

	if (argc != 4 || (strcmp(argv[1], "creat2") && mode_flags(argv[1], &flags)) ||
	    (want = expected_errno(argv[3])) < 0) {
		fprintf(stderr,
			"usage: guest_open trunc|append|creat|rdcreat|excl|plain|creat2 PATH ok|EEXIST|ENOENT\n");
		return 2;
	}
	if (!strcmp(argv[1], "creat2"))
		fd = creat(argv[2], 0640);
	else
		fd = open(argv[2], flags, 0640);
	got = fd < 0 ? errno : 0;
	if (fd >= 0)
		close(fd);
	if (got != want) {
		fprintf(stderr, "guest_open %s %s: got %s, expected %s\n", argv[1], argv[2],
			got ? strerror(got) : "ok", argv[3]);
		return 1;
	}
	return 0;
}
