// gcp-peer: the benchmark's go-control-plane peer (bench/peers/gcp.py starts it).
//
// It serves, over ADS (state-of-the-world and delta on one gRPC port), exactly the
// resources Meshline serves a bench sidecar: bench/peers/gcp.py fetches them from a
// `meshline serve` on the same generated mesh and writes them to a JSON file
// ({"<type URL>": ["<base64 of the serialized resource>", ...]}), so both control planes
// send the same bytes per resource.
//
// Caches, as a careful go-control-plane user would set them up for a mesh whose endpoints
// churn and whose other config is shared by every sidecar:
//   - CDS, LDS, RDS: one pkg/cache/v3 snapshot cache in ADS mode, every node hashed to one
//     group (all bench sidecars get the same config), so one SetSnapshot serves them all.
//   - EDS: a pkg/cache/v3 LinearCache (per-resource versions): a changed
//     ClusterLoadAssignment wakes only the watches naming it, and SotW responses carry only
//     the changed CLA (EDS does not need full state), not every CLA as a snapshot cache would.
//
// Changes: POST /cla {"cluster": "<name>", "addresses": ["10.0.0.1", ...]} replaces the
// addresses of that CLA's endpoints (in order; everything else is kept) and returns once
// the cache has handed the new CLA to every open watch. GET /ready answers 200.
package main

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"flag"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/signal"
	"syscall"
	"time"

	cluster "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	endpoint "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
	listener "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	route "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	discoverygrpc "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"github.com/envoyproxy/go-control-plane/pkg/cache/types"
	cachev3 "github.com/envoyproxy/go-control-plane/pkg/cache/v3"
	resourcev3 "github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	serverv3 "github.com/envoyproxy/go-control-plane/pkg/server/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/keepalive"
	"google.golang.org/protobuf/proto"
)

// oneGroup hashes every node to one snapshot: the bench sidecars share one config.
type oneGroup struct{}

func (oneGroup) ID(*core.Node) string { return "mesh" }

// quiet drops the caches' debug/info lines (a log line per response would cost CPU that
// Meshline, logging at info, does not pay); warnings and errors go to stderr.
type quiet struct{}

func (quiet) Debugf(string, ...any) {}
func (quiet) Infof(string, ...any)  {}
func (quiet) Warnf(f string, a ...any) {
	fmt.Fprintf(os.Stderr, "warn: "+f+"\n", a...)
}
func (quiet) Errorf(f string, a ...any) {
	fmt.Fprintf(os.Stderr, "error: "+f+"\n", a...)
}

func decode(typeURL string, raw []byte) (types.Resource, error) {
	var m proto.Message
	switch typeURL {
	case resourcev3.ClusterType:
		m = &cluster.Cluster{}
	case resourcev3.EndpointType:
		m = &endpoint.ClusterLoadAssignment{}
	case resourcev3.ListenerType:
		m = &listener.Listener{}
	case resourcev3.RouteType:
		m = &route.RouteConfiguration{}
	default:
		return nil, fmt.Errorf("unsupported type %s", typeURL)
	}
	if err := proto.Unmarshal(raw, m); err != nil {
		return nil, fmt.Errorf("%s: %w", typeURL, err)
	}
	return m.(types.Resource), nil
}

func load(path string) (map[string][]types.Resource, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	var dump map[string][]string
	if err := json.Unmarshal(data, &dump); err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	out := map[string][]types.Resource{}
	for typeURL, items := range dump {
		for i, b64 := range items {
			raw, err := base64.StdEncoding.DecodeString(b64)
			if err != nil {
				return nil, fmt.Errorf("%s: %s[%d]: %w", path, typeURL, i, err)
			}
			r, err := decode(typeURL, raw)
			if err != nil {
				return nil, fmt.Errorf("%s: %s[%d]: %w", path, typeURL, i, err)
			}
			out[typeURL] = append(out[typeURL], r)
		}
	}
	return out, nil
}

type change struct {
	Cluster   string   `json:"cluster"`
	Addresses []string `json:"addresses"`
}

func main() {
	dumpPath := flag.String("resources", "", "JSON dump of the resources to serve (written by bench/peers/gcp.py)")
	xdsAddr := flag.String("xds-address", "127.0.0.1:18000", "ADS gRPC listen address")
	ctlAddr := flag.String("control-address", "127.0.0.1:18001", "HTTP control listen address")
	flag.Parse()
	if *dumpPath == "" {
		fmt.Fprintln(os.Stderr, "--resources is required")
		os.Exit(2)
	}
	res, err := load(*dumpPath)
	if err != nil {
		fmt.Fprintln(os.Stderr, "loading resources:", err)
		os.Exit(1)
	}
	ctx, cancel := signal.NotifyContext(context.Background(), syscall.SIGTERM, os.Interrupt)
	defer cancel()

	snap := &cachev3.Snapshot{}
	for _, t := range []string{resourcev3.ClusterType, resourcev3.ListenerType, resourcev3.RouteType} {
		snap.Resources[cachev3.GetResponseType(t)] = cachev3.NewResources("1", res[t])
	}
	snapshots := cachev3.NewSnapshotCache(true, oneGroup{}, quiet{})
	if err := snapshots.SetSnapshot(ctx, "mesh", snap); err != nil {
		fmt.Fprintln(os.Stderr, "snapshot:", err)
		os.Exit(1)
	}
	clas := map[string]types.Resource{}
	for _, r := range res[resourcev3.EndpointType] {
		clas[r.(*endpoint.ClusterLoadAssignment).GetClusterName()] = r
	}
	eds := cachev3.NewLinearCache(resourcev3.EndpointType, cachev3.WithInitialResources(clas), cachev3.WithLogger(quiet{}))
	mux := &cachev3.MuxCache{
		Classify: func(r *cachev3.Request) string {
			if r.GetTypeUrl() == resourcev3.EndpointType {
				return "eds"
			}
			return "snapshot"
		},
		ClassifyDelta: func(r *cachev3.DeltaRequest) string {
			if r.GetTypeUrl() == resourcev3.EndpointType {
				return "eds"
			}
			return "snapshot"
		},
		Caches: map[string]cachev3.Cache{"eds": eds, "snapshot": snapshots},
	}
	xds := serverv3.NewServer(ctx, mux, nil)

	// The same transport limits as Meshline's xDS server (controlplane/xds/server.py,
	// grpc_options), so neither control plane is measured under stricter ones:
	//   - keepalive: a PING after 30 s without reads, and the connection is closed when its
	//     ACK takes longer than 20 s (gRPC core's default keepalive_timeout, which Meshline
	//     keeps). go-control-plane's example server allows 5 s: on this loaded 2-core machine
	//     one Python process driving 1,000 connections answered some PINGs later than that
	//     while the fleet synced, and the peer closed those connections ("Socket closed",
	//     issue 20's 1,000-delta failure); Meshline would have waited 20 s.
	//   - 100 concurrent streams per connection (Meshline's max_streams_per_connection),
	//     4 MiB per request (grpc-go's default, Meshline's max_request_bytes), 256 MiB per
	//     response.
	//   - clients may not ping more often than every 5 minutes without data (gRPC core's
	//     default; the simulated clients do not ping at all).
	gs := grpc.NewServer(
		grpc.MaxConcurrentStreams(100),
		grpc.MaxRecvMsgSize(4<<20),
		grpc.MaxSendMsgSize(256<<20),
		grpc.KeepaliveParams(keepalive.ServerParameters{Time: 30 * time.Second, Timeout: 20 * time.Second}),
		grpc.KeepaliveEnforcementPolicy(keepalive.EnforcementPolicy{MinTime: 5 * time.Minute, PermitWithoutStream: true}),
	)
	discoverygrpc.RegisterAggregatedDiscoveryServiceServer(gs, xds)
	lis, err := net.Listen("tcp", *xdsAddr)
	if err != nil {
		fmt.Fprintln(os.Stderr, "listen:", err)
		os.Exit(1)
	}
	go func() {
		if err := gs.Serve(lis); err != nil {
			fmt.Fprintln(os.Stderr, "grpc:", err)
		}
	}()

	mu := make(chan struct{}, 1) // one change at a time (guards clas)
	http.HandleFunc("/ready", func(w http.ResponseWriter, _ *http.Request) { w.WriteHeader(http.StatusOK) })
	http.HandleFunc("/cla", func(w http.ResponseWriter, r *http.Request) {
		var c change
		if err := json.NewDecoder(r.Body).Decode(&c); err != nil {
			http.Error(w, "bad change: "+err.Error(), http.StatusBadRequest)
			return
		}
		mu <- struct{}{}
		defer func() { <-mu }()
		cur, ok := clas[c.Cluster]
		if !ok {
			http.Error(w, "no ClusterLoadAssignment named "+c.Cluster, http.StatusNotFound)
			return
		}
		next := proto.Clone(cur).(*endpoint.ClusterLoadAssignment)
		i := 0
		for _, loc := range next.GetEndpoints() {
			for _, lb := range loc.GetLbEndpoints() {
				if i < len(c.Addresses) {
					lb.GetEndpoint().GetAddress().GetSocketAddress().Address = c.Addresses[i]
				}
				i++
			}
		}
		if i != len(c.Addresses) {
			http.Error(w, fmt.Sprintf("%s has %d endpoints, the change names %d addresses", c.Cluster, i, len(c.Addresses)),
				http.StatusBadRequest)
			return
		}
		if err := eds.UpdateResource(c.Cluster, next); err != nil {
			http.Error(w, err.Error(), http.StatusInternalServerError)
			return
		}
		clas[c.Cluster] = next
		w.WriteHeader(http.StatusNoContent)
	})
	hs := &http.Server{Addr: *ctlAddr}
	go func() {
		if err := hs.ListenAndServe(); err != nil && err != http.ErrServerClosed {
			fmt.Fprintln(os.Stderr, "control:", err)
			os.Exit(1)
		}
	}()
	fmt.Fprintf(os.Stderr, "serving %d clusters, %d CLAs, %d listeners, %d routes on %s (control %s)\n",
		len(res[resourcev3.ClusterType]), len(clas), len(res[resourcev3.ListenerType]), len(res[resourcev3.RouteType]),
		*xdsAddr, *ctlAddr)
	<-ctx.Done()
	gs.Stop()
	_ = hs.Close()
}
