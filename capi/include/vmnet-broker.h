/*
 * vmnet-broker C client library (libvmnetbroker). Protocol: docs/protocol.md.
 *
 *     struct vmnet_broker_network_info info;
 *     vmnet_broker_return_t status;
 *     int fd = vmnet_broker_acquire_network("shared", &info, &status);
 *     if (fd < 0) {
 *         fprintf(stderr, "failed to acquire network: (%d) %s\n",
 *                 status, vmnet_broker_strerror(status));
 *         exit(EXIT_FAILURE);
 *     }
 *     // fd is a TAP device attached to bridge info.bridge; give it to the VMM,
 *     // e.g. QEMU "-netdev tap,id=n0,fd=<fd>" with guest MAC info.mac.
 *
 * Lease: each successful acquire opens its own connection to the broker, which this
 * library keeps open for the life of the process, so the network stays held while the
 * program runs. vmnet_broker_release(fd) ends one lease early.
 *
 * The broker's socket is $VMNET_BROKER_SOCKET, or /run/vmnet-broker/vmnet-broker.sock.
 * All functions are thread-safe. Received file descriptors are close-on-exec; clear
 * FD_CLOEXEC (or dup2 it) to hand one to a child process.
 */
#ifndef VMNET_BROKER_H
#define VMNET_BROKER_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/*
 * Status codes: the original vmnet-broker's numbers, never renumbered. A code this
 * header does not list (from a newer broker) is passed through as is.
 */
typedef int vmnet_broker_return_t;

enum {
    VMNET_BROKER_SUCCESS = 0,
    /* Could not connect to the broker, or the connection broke (client side). */
    VMNET_BROKER_XPC_FAILURE = 1,
    VMNET_BROKER_BROKER_UNREACHABLE = 1,
    /* The broker's reply was malformed (client side). */
    VMNET_BROKER_INVALID_REPLY = 2,
    /* Your user/groups are not in the network's allowed_users/allowed_groups. */
    VMNET_BROKER_NOT_ALLOWED = 3,
    /* Bad network name or MAC, MAC in use. */
    VMNET_BROKER_INVALID_REQUEST = 4,
    /* No such network (or its definition file is invalid). */
    VMNET_BROKER_NOT_FOUND = 5,
    VMNET_BROKER_CREATE_FAILURE = 6,
    /* Anything else, including a 9th distinct network on one connection. */
    VMNET_BROKER_INTERNAL_ERROR = 7,
    /* A port forward's port is taken (this broker's forward request; not sent by the
       original broker, and never in answer to an acquire). */
    VMNET_BROKER_PORT_IN_USE = 8,
};

/* Everything is a NUL-terminated string except mtu. */
struct vmnet_broker_network_info {
    char name[65];      /* the network's name */
    char mode[16];      /* "shared" (NAT, DHCP, DNS) or "host" */
    char subnet[64];    /* CIDR, e.g. "192.168.64.0/24" */
    char gateway[64];   /* the host's address on the network, e.g. "192.168.64.1" */
    char mask[64];      /* e.g. "255.255.255.0" */
    uint32_t mtu;
    char bridge[16];    /* the bridge the TAP is attached to */
    char interface[16]; /* the TAP interface of the returned fd */
    char mac[18];       /* the MAC the guest should use, "52:xx:xx:xx:xx:xx" */
};

/*
 * Acquires the network `name` and returns a TAP file descriptor attached to it, or -1.
 * `info` (may be NULL) receives the network's description; `status` (may be NULL)
 * receives VMNET_BROKER_SUCCESS or the error code.
 */
int vmnet_broker_acquire_network(const char *name,
                                 struct vmnet_broker_network_info *info,
                                 vmnet_broker_return_t *status);

/*
 * Like vmnet_broker_acquire_network, asking for guest MAC `mac` ("52:54:00:12:34:56"),
 * e.g. the one the VM had before so it keeps its DHCP lease. NULL means no preference.
 */
int vmnet_broker_acquire_network_with_mac(const char *name, const char *mac,
                                          struct vmnet_broker_network_info *info,
                                          vmnet_broker_return_t *status);

/*
 * Releases the network acquired with `fd`: closes `fd` and its broker connection.
 * Returns 0, or -1 with errno EBADF when `fd` is not an unreleased acquire's fd.
 * If you close `fd` yourself instead, the network stays held until the process exits.
 */
int vmnet_broker_release(int fd);

/* A static description of `status` (the original library's strings). */
const char *vmnet_broker_strerror(vmnet_broker_return_t status);

#ifdef __cplusplus
}
#endif

#endif /* VMNET_BROKER_H */
