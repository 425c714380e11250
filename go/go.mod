module github.com/vmnet-broker/vmnet-broker/go

go 1.19
