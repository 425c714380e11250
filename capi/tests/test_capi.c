/*
 * C-side checks of libvmnetbroker, driven by tests/c.rs:
 *   test_capi layout                 print the ABI layout for comparison with Rust
 *   test_capi strerror < table       lines "CODE<TAB>STRING" must match vmnet_broker_strerror
 *   test_capi unreachable            $VMNET_BROKER_SOCKET names no broker
 *   test_capi acquire NAME CODE [MAC]  acquire; CODE 0 checks the TAP and prints the info
 */
#include <errno.h>
#include <fcntl.h>
#include <linux/if.h>
#include <linux/if_tun.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <unistd.h>

#include "vmnet-broker.h"

#define CHECK(cond)                                                                    \
    do {                                                                               \
        if (!(cond)) {                                                                 \
            fprintf(stderr, "%s:%d: check failed: %s\n", __FILE__, __LINE__, #cond);  \
            exit(1);                                                                   \
        }                                                                              \
    } while (0)

static int layout(void)
{
    printf("{\"size\":%zu,\"mtu\":%zu,\"bridge\":%zu,\"interface\":%zu,\"mac\":%zu}\n",
           sizeof(struct vmnet_broker_network_info),
           offsetof(struct vmnet_broker_network_info, mtu),
           offsetof(struct vmnet_broker_network_info, bridge),
           offsetof(struct vmnet_broker_network_info, interface),
           offsetof(struct vmnet_broker_network_info, mac));
    return 0;
}

static int strerror_table(void)
{
    char line[512];
    int n = 0;
    while (fgets(line, sizeof line, stdin)) {
        char *tab = strchr(line, '\t');
        CHECK(tab != NULL);
        *tab = '\0';
        char *want = tab + 1;
        want[strcspn(want, "\n")] = '\0';
        const char *got = vmnet_broker_strerror(atoi(line));
        if (strcmp(got, want) != 0) {
            fprintf(stderr, "strerror(%s) = \"%s\", want \"%s\"\n", line, got, want);
            return 1;
        }
        n++;
    }
    CHECK(n > 0);
    CHECK(VMNET_BROKER_XPC_FAILURE == VMNET_BROKER_BROKER_UNREACHABLE);
    return 0;
}

static int unreachable(void)
{
    vmnet_broker_return_t status = -100;
    struct vmnet_broker_network_info info;
    memset(&info, 0x55, sizeof info);
    CHECK(vmnet_broker_acquire_network("shared", &info, &status) == -1);
    CHECK(status == VMNET_BROKER_BROKER_UNREACHABLE);
    CHECK(((unsigned char *)&info)[0] == 0x55); /* untouched on failure */
    /* info and status may be NULL */
    CHECK(vmnet_broker_acquire_network("shared", NULL, NULL) == -1);
    CHECK(vmnet_broker_acquire_network(NULL, NULL, &status) == -1);
    CHECK(status == VMNET_BROKER_INVALID_REQUEST);
    CHECK(vmnet_broker_acquire_network_with_mac("shared", "01:00:5e:00:00:01", NULL, &status) == -1);
    CHECK(status == VMNET_BROKER_INVALID_REQUEST);
    errno = 0;
    CHECK(vmnet_broker_release(12345) == -1 && errno == EBADF);
    printf("%s\n", vmnet_broker_strerror(VMNET_BROKER_BROKER_UNREACHABLE));
    return 0;
}

static int acquire(const char *name, int want, const char *mac)
{
    struct vmnet_broker_network_info info;
    vmnet_broker_return_t status = -100;
    int fd = vmnet_broker_acquire_network_with_mac(name, mac, &info, &status);
    if (want != 0) {
        if (fd != -1 || status != want) {
            fprintf(stderr, "acquire %s: fd %d status %d, want -1 and %d\n", name, fd, status, want);
            return 1;
        }
        printf("{\"status\":%d,\"strerror\":\"%s\"}\n", status, vmnet_broker_strerror(status));
        return 0;
    }
    if (fd < 0) {
        fprintf(stderr, "acquire %s: (%d) %s\n", name, status, vmnet_broker_strerror(status));
        return 1;
    }
    CHECK(status == VMNET_BROKER_SUCCESS);
    struct stat st;
    CHECK(fstat(fd, &st) == 0 && S_ISCHR(st.st_mode));
    CHECK(fcntl(fd, F_GETFD) & FD_CLOEXEC);
    struct ifreq ifr;
    memset(&ifr, 0, sizeof ifr);
    CHECK(ioctl(fd, TUNGETIFF, &ifr) == 0);
    if (strcmp(ifr.ifr_name, info.interface) != 0) {
        fprintf(stderr, "fd is TAP %s, info says %s\n", ifr.ifr_name, info.interface);
        return 1;
    }
    printf("{\"status\":0,\"fd\":%d,\"name\":\"%s\",\"mode\":\"%s\",\"subnet\":\"%s\","
           "\"gateway\":\"%s\",\"mask\":\"%s\",\"mtu\":%u,\"bridge\":\"%s\","
           "\"interface\":\"%s\",\"mac\":\"%s\"}\n",
           fd, info.name, info.mode, info.subnet, info.gateway, info.mask, info.mtu,
           info.bridge, info.interface, info.mac);
    fflush(stdout);
    /* Hold the lease until the driver says so (closes our stdin). */
    char buf[16];
    while (read(0, buf, sizeof buf) > 0) {
    }
    CHECK(vmnet_broker_release(fd) == 0);
    CHECK(fcntl(fd, F_GETFD) == -1 && errno == EBADF); /* release closed the fd */
    CHECK(vmnet_broker_release(fd) == -1);
    return 0;
}

int main(int argc, char **argv)
{
    if (argc >= 2 && strcmp(argv[1], "layout") == 0)
        return layout();
    if (argc >= 2 && strcmp(argv[1], "strerror") == 0)
        return strerror_table();
    if (argc >= 2 && strcmp(argv[1], "unreachable") == 0)
        return unreachable();
    if (argc >= 4 && strcmp(argv[1], "acquire") == 0)
        return acquire(argv[2], atoi(argv[3]), argc >= 5 ? argv[4] : NULL);
    fprintf(stderr, "usage: test_capi layout|strerror|unreachable|acquire NAME CODE [MAC]\n");
    return 2;
}
