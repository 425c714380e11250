/*
 * Acquires a network from vmnet-broker, prints it and holds it until interrupted
 * (the counterpart of the original project's test.c).
 *
 *     cc -o acquire acquire.c $(pkg-config --cflags --libs vmnet-broker)
 *     ./acquire [NAME]
 */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

#include "vmnet-broker.h"

static void on_signal(int sig) { (void)sig; }

int main(int argc, char **argv)
{
    const char *name = argc > 1 ? argv[1] : "shared";
    struct vmnet_broker_network_info info;
    vmnet_broker_return_t status;

    int fd = vmnet_broker_acquire_network(name, &info, &status);
    if (fd < 0) {
        fprintf(stderr, "failed to acquire network %s: (%d) %s\n", name, status,
                vmnet_broker_strerror(status));
        return EXIT_FAILURE;
    }
    printf("network:   %s (%s)\n", info.name, info.mode);
    printf("subnet:    %s gateway %s mask %s mtu %u\n", info.subnet, info.gateway, info.mask,
           info.mtu);
    printf("bridge:    %s\n", info.bridge);
    printf("interface: %s (fd %d)\n", info.interface, fd);
    printf("guest mac: %s\n", info.mac);
    printf("holding the network; press Ctrl-C to release it\n");
    fflush(stdout);

    struct sigaction sa = {.sa_handler = on_signal};
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);
    pause();

    printf("releasing\n");
    if (vmnet_broker_release(fd) != 0) {
        perror("vmnet_broker_release");
        return EXIT_FAILURE;
    }
    return EXIT_SUCCESS;
}
