/*
 * Holds one KVM VM open in the nested host for the whole run, so the host's
 * count of KVM VMs never goes from 0 to 1 and back. KVM flips the
 * preempt-notifier static branch in __schedule on each such change, and
 * QEMU 7.2's TCG was seen to keep running the stale code and wedge both
 * nested CPUs (see tests/nested/README.md). run.sh builds it statically.
 */
#include <fcntl.h>
#include <linux/kvm.h>
#include <stdio.h>
#include <sys/ioctl.h>
#include <unistd.h>

int main(void)
{
	int kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
	if (kvm < 0) {
		perror("keeper: open /dev/kvm (is kvm-amd loaded?)");
		return 1;
	}
	int vm = ioctl(kvm, KVM_CREATE_VM, 0);
	if (vm < 0) {
		perror("keeper: KVM_CREATE_VM");
		return 1;
	}
	puts("NESTED-KEEPER: holding one KVM VM for the run");
	fflush(stdout);
	for (;;)
		pause();
}
