// Command vmnet-broker-example acquires a network from vmnet-broker, prints what it got
// and holds it until interrupted: closing the connection on exit releases the network.
//
//	vmnet-broker-example [-socket PATH] [-mac MAC] [NAME]
package main

import (
	"errors"
	"flag"
	"fmt"
	"net"
	"os"
	"os/signal"
	"syscall"

	"github.com/vmnet-broker/vmnet-broker/go/vmnetbroker"
)

func main() {
	socket := flag.String("socket", "", "broker socket (default $VMNET_BROKER_SOCKET or "+vmnetbroker.DefaultSocketPath+")")
	macFlag := flag.String("mac", "", "guest MAC to keep (default: the broker suggests one)")
	flag.Parse()
	name := "shared"
	if flag.NArg() > 0 {
		name = flag.Arg(0)
	}

	client, err := vmnetbroker.Connect(*socket)
	if err != nil {
		fail(err)
	}
	defer client.Close()

	var network *vmnetbroker.Network
	if *macFlag != "" {
		mac, perr := net.ParseMAC(*macFlag)
		if perr != nil {
			fail(perr)
		}
		network, err = client.AcquireWithMAC(name, mac)
	} else {
		network, err = client.Acquire(name)
	}
	if err != nil {
		fail(err)
	}
	defer network.Close()

	fmt.Printf("network:   %s (%s)\n", network.Name, network.Mode)
	fmt.Printf("subnet:    %s gateway %s mask %s mtu %d\n", network.Subnet, network.Gateway, network.Mask, network.MTU)
	fmt.Printf("bridge:    %s\n", network.Bridge)
	fmt.Printf("interface: %s (fd %d)\n", network.Interface, network.File.Fd())
	fmt.Printf("guest mac: %s\n", network.MAC)
	fmt.Println("holding the network; press Ctrl-C to release it")

	signals := make(chan os.Signal, 1)
	signal.Notify(signals, os.Interrupt, syscall.SIGTERM)
	<-signals
	fmt.Println("releasing")
}

func fail(err error) {
	var e *vmnetbroker.Error
	if errors.As(err, &e) {
		fmt.Fprintf(os.Stderr, "vmnet-broker-example: (%d) %s\n", int64(e.Code), err)
	} else {
		fmt.Fprintf(os.Stderr, "vmnet-broker-example: %s\n", err)
	}
	os.Exit(1)
}
