// Command etcd is etcd's own server entry point (etcdmain), built from the Go module
// proxy so that the Kubernetes tests run against a real etcd of a pinned release.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() {
	etcdmain.Main(os.Args)
}
