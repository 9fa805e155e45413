// Command goload is the benchmark's load generator: the client side of the conn/s, RTT and
// throughput windows, compiled, so that the load side costs far less CPU per connection
// than the proxy it measures (the Python load generator cost about as much as the proxy,
// and filled its CPU first). Standard library only.
//
// Modes (-mode):
//
//	connrate:   -concurrency workers, each looping until -duration has passed: TCP dial,
//	            TLS full handshake (with -tls; no session resumption unless -resume), write
//	            -size bytes, read them back, close.
//	rtt:        one established connection, -count round trips of -size bytes (after
//	            -warmup uncounted ones).
//	throughput: one established connection; -bytes bytes one way to the backend's sink
//	            (`S` + 8-byte big-endian length, then the bytes; the far end answers the
//	            count), or with -echo the same bytes echoed back while they are sent.
//	backend:    the far end of the load side, as bench_backend.py: one plain and one mTLS
//	            listener on 127.0.0.1 (the mTLS one presents the leaf from standard input and
//	            requires a client leaf from its roots); per connection the first byte
//	            decides: `S` + 8-byte length is the counting sink, anything else is echoed.
//	            Prints `READY plain=<port> tls=<port>` and serves until SIGTERM or SIGINT
//	            (no GO line).
//
// The server's certificate chain is verified against the roots, without a host name (as
// the Python load side does: Connect certificates carry a SPIFFE URI, not the address).
//
// Standard input carries, as its first line, the key material as one JSON object
// (`{"CertPEM","PrivateKeyPEM","RootsPEM"}`, or `{}` without -tls); never a file, never
// an argument. goload then sets up (connrate: the TLS configuration; rtt and throughput:
// the connection), prints `READY mode=<mode> gomaxprocs=<n>`, and waits for a line `GO` on
// standard input: the harness takes its CPU readings at that instant. The window's result
// is one line `RESULT <json>`. End of input before `GO` ends the process (its harness is
// gone). Every wait has a deadline (-timeout per network operation).
package main

import (
	"bufio"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"runtime"
	"runtime/debug"
	"sort"
	"strings"
	"sync"
	"syscall"
	"time"
)

const maxDuration = 10 * time.Minute // no window runs longer, whatever -duration says

type material struct {
	CertPEM       string
	PrivateKeyPEM string
	RootsPEM      string
}

type options struct {
	mode        string
	addr        string
	tls         bool
	resume      bool
	concurrency int
	duration    time.Duration
	size        int
	count       int
	warmup      int
	bytes       int64
	echo        bool
	timeout     time.Duration
}

func main() {
	var o options
	flag.StringVar(&o.mode, "mode", "", "connrate, rtt, throughput or backend")
	flag.StringVar(&o.addr, "addr", "", "host:port to connect to")
	flag.BoolVar(&o.tls, "tls", false, "mTLS with the leaf from standard input (else plain TCP)")
	flag.BoolVar(&o.resume, "resume", false, "resume TLS sessions (default: a full handshake every time)")
	flag.IntVar(&o.concurrency, "concurrency", 64, "connrate: concurrent workers")
	flag.DurationVar(&o.duration, "duration", 3*time.Second, "connrate: length of the window")
	flag.IntVar(&o.size, "size", 1, "connrate, rtt: bytes written and read back per connection or round trip")
	flag.IntVar(&o.count, "count", 3000, "rtt: round trips counted")
	flag.IntVar(&o.warmup, "warmup", 50, "rtt: round trips before those counted")
	flag.Int64Var(&o.bytes, "bytes", 512<<20, "throughput: bytes to send")
	flag.BoolVar(&o.echo, "echo", false, "throughput: read the bytes back from an echo server")
	flag.DurationVar(&o.timeout, "timeout", 10*time.Second, "deadline of each network operation")
	flag.Parse()

	if os.Getenv("GOGC") == "" {
		// A handshake allocates tens of KiB and the live heap is small: with Go's default
		// the collector would run every few milliseconds at these rates.
		debug.SetGCPercent(400)
	}
	if err := run(o); err != nil {
		fmt.Fprintf(os.Stderr, "[ERROR] goload: %v\n", err)
		os.Exit(1)
	}
}

func check(o options) error {
	switch {
	case o.mode != "connrate" && o.mode != "rtt" && o.mode != "throughput" && o.mode != "backend":
		return fmt.Errorf("-mode must be connrate, rtt, throughput or backend, got %q", o.mode)
	case o.addr == "" && o.mode != "backend":
		return errors.New("-addr is required")
	case o.concurrency < 1 || o.concurrency > 10000:
		return fmt.Errorf("-concurrency must be 1..10000, got %d", o.concurrency)
	case o.duration <= 0 || o.duration > maxDuration:
		return fmt.Errorf("-duration must be in (0, %s], got %s", maxDuration, o.duration)
	case o.size < 1 || o.size > 1<<20:
		return fmt.Errorf("-size must be 1..1048576, got %d", o.size)
	case o.count < 1 || o.warmup < 0:
		return fmt.Errorf("-count must be at least 1 and -warmup at least 0, got %d and %d", o.count, o.warmup)
	case o.bytes < 1:
		return fmt.Errorf("-bytes must be at least 1, got %d", o.bytes)
	case o.timeout <= 0:
		return fmt.Errorf("-timeout must be positive, got %s", o.timeout)
	}
	return nil
}

func run(o options) error {
	if err := check(o); err != nil {
		return err
	}
	in := bufio.NewReaderSize(os.Stdin, 64<<10)
	line, err := readLine(in, 1<<20)
	if err != nil {
		return fmt.Errorf("reading the key material line from stdin: %w", err)
	}
	if o.mode == "backend" {
		return serveBackend(line)
	}
	var cfg *tls.Config
	if o.tls {
		if cfg, err = clientConfig(line, o.resume); err != nil {
			return err
		}
	}
	c := &client{o: o, cfg: cfg}
	var window func() (map[string]any, error)
	switch o.mode {
	case "connrate":
		window = c.connRate
	case "rtt":
		window, err = c.prepareRTT()
	case "throughput":
		window, err = c.prepareThroughput()
	}
	if err != nil {
		return err
	}
	fmt.Printf("READY mode=%s gomaxprocs=%d\n", o.mode, runtime.GOMAXPROCS(0))
	if err := waitGo(in); err != nil {
		return err
	}
	res, err := window()
	if err != nil {
		return err
	}
	res["mode"] = o.mode
	res["gomaxprocs"] = runtime.GOMAXPROCS(0)
	out, err := json.Marshal(res)
	if err != nil {
		return err
	}
	fmt.Printf("RESULT %s\n", out)
	return nil
}

// readLine reads one line of at most max bytes (without its newline).
func readLine(r *bufio.Reader, max int) ([]byte, error) {
	var buf []byte
	for {
		chunk, err := r.ReadSlice('\n')
		buf = append(buf, chunk...)
		if len(buf) > max {
			return nil, fmt.Errorf("line longer than %d bytes", max)
		}
		if err == nil {
			return buf[:len(buf)-1], nil
		}
		if errors.Is(err, io.EOF) && len(buf) > 0 {
			return buf, nil // a last line without its newline
		}
		if !errors.Is(err, bufio.ErrBufferFull) {
			return nil, err
		}
	}
}

func waitGo(r *bufio.Reader) error {
	line, err := readLine(r, 64)
	if err != nil {
		return fmt.Errorf("waiting for GO on stdin: %w", err)
	}
	if strings.TrimSpace(string(line)) != "GO" {
		return fmt.Errorf("expected GO on stdin, got %q", line)
	}
	return nil
}

// clientConfig is the mTLS client side: the leaf as client certificate, the server's chain
// verified against the roots (any extended key usage, no host name).
func clientConfig(line []byte, resume bool) (*tls.Config, error) {
	var m material
	if err := json.Unmarshal(line, &m); err != nil {
		return nil, fmt.Errorf("key material on stdin is not JSON: %w", err)
	}
	cert, err := tls.X509KeyPair([]byte(m.CertPEM), []byte(m.PrivateKeyPEM))
	if err != nil {
		return nil, fmt.Errorf("leaf (CertPEM, PrivateKeyPEM): %w", err)
	}
	roots := x509.NewCertPool()
	if !roots.AppendCertsFromPEM([]byte(m.RootsPEM)) {
		return nil, errors.New("roots: no certificate in RootsPEM")
	}
	v := &verifier{roots: roots}
	cfg := &tls.Config{
		Certificates: []tls.Certificate{cert},
		MinVersion:   tls.VersionTLS12,
		// No host name to check: the chain is verified below, as the Python client does
		// with check_hostname off.
		InsecureSkipVerify: true,
		VerifyConnection: func(st tls.ConnectionState) error {
			return v.verify(st.PeerCertificates)
		},
	}
	if resume {
		cfg.ClientSessionCache = tls.NewLRUClientSessionCache(256)
	}
	return cfg, nil
}

// verifier checks server chains against the roots. A chain whose exact bytes it verified
// before is accepted again without the path walk (the server presents the same leaf on every
// connection, and the path walk is a signature check per certificate); the handshake's own
// signature, proving the server holds that leaf's key, is checked by crypto/tls every time.
type verifier struct {
	roots *x509.CertPool
	mu    sync.Mutex
	ok    map[string]bool // the chains verified, by their concatenated DER
}

func (v *verifier) verify(certs []*x509.Certificate) error {
	if len(certs) == 0 {
		return errors.New("no server certificate")
	}
	var key strings.Builder
	for _, c := range certs {
		key.Write(c.Raw)
		key.WriteByte(0)
	}
	v.mu.Lock()
	seen := v.ok[key.String()]
	v.mu.Unlock()
	if seen {
		return nil
	}
	if err := verifyChain(certs, v.roots); err != nil {
		return err
	}
	v.mu.Lock()
	if v.ok == nil || len(v.ok) >= 64 { // bounded: a rotation brings a few new chains
		v.ok = map[string]bool{}
	}
	v.ok[key.String()] = true
	v.mu.Unlock()
	return nil
}

func verifyChain(certs []*x509.Certificate, roots *x509.CertPool) error {
	inter := x509.NewCertPool()
	for _, c := range certs[1:] {
		inter.AddCert(c)
	}
	_, err := certs[0].Verify(x509.VerifyOptions{
		Roots:         roots,
		Intermediates: inter,
		KeyUsages:     []x509.ExtKeyUsage{x509.ExtKeyUsageAny},
	})
	return err
}

// cpuSeconds is this process's user+system CPU so far (every thread).
func cpuSeconds() float64 {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano()).Seconds()
}

// percentiles of samples (sorted in place) by linear interpolation, as bench_util.percentile,
// scaled from durations to `unit`.
func percentiles(samples []time.Duration, unit time.Duration) map[string]any {
	sort.Slice(samples, func(i, j int) bool { return samples[i] < samples[j] })
	at := func(q float64) any {
		if len(samples) == 0 {
			return nil
		}
		pos := q * float64(len(samples)-1)
		lo := int(pos)
		v := float64(samples[lo])
		if lo+1 < len(samples) {
			v += (pos - float64(lo)) * float64(samples[lo+1]-samples[lo])
		}
		return v / float64(unit)
	}
	return map[string]any{
		"n": len(samples), "p50": at(0.5), "p90": at(0.9), "p99": at(0.99), "max": at(1),
	}
}
