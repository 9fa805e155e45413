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
	"encoding/binary"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"os/signal"
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

// -- one client connection ----------------------------------------------------------------

type client struct {
	o   options
	cfg *tls.Config
}

// opError is a failed step of a connection: kind names the step (dial, handshake, write,
// read, echo), with `_timeout` appended when its deadline passed.
type opError struct {
	kind string
	err  error
}

func (e *opError) Error() string { return e.kind + ": " + e.err.Error() }

func fail(step string, err error) *opError {
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		return &opError{step + "_timeout", err}
	}
	return &opError{step, err}
}

// dial opens a connection (and does the TLS handshake with -tls); the deadline covers both.
func (c *client) dial() (net.Conn, *tls.ConnectionState, *opError) {
	d := net.Dialer{Timeout: c.o.timeout}
	raw, err := d.Dial("tcp", c.o.addr) // Go sets TCP_NODELAY, as the proxy's peers do
	if err != nil {
		return nil, nil, fail("dial", err)
	}
	if c.cfg == nil {
		return raw, nil, nil
	}
	_ = raw.SetDeadline(time.Now().Add(c.o.timeout))
	conn := tls.Client(raw, c.cfg)
	if err := conn.Handshake(); err != nil {
		raw.Close()
		return nil, nil, fail("handshake", err)
	}
	_ = raw.SetDeadline(time.Time{})
	st := conn.ConnectionState()
	return conn, &st, nil
}

// roundTrip writes payload and reads as many bytes back into buf, checking them.
func roundTrip(conn net.Conn, payload, buf []byte) *opError {
	if _, err := conn.Write(payload); err != nil {
		return fail("write", err)
	}
	if _, err := io.ReadFull(conn, buf); err != nil {
		return fail("read", err)
	}
	for i := range buf {
		if buf[i] != payload[i] {
			return &opError{"echo", fmt.Errorf("byte %d came back as %#x, sent %#x", i, buf[i], payload[i])}
		}
	}
	return nil
}

// once is one connection of the conn/s loop.
func (c *client) once(payload, buf []byte) (*tls.ConnectionState, *opError) {
	conn, st, e := c.dial()
	if e != nil {
		return nil, e
	}
	defer conn.Close() // close_notify (TLS), then FIN
	_ = conn.SetDeadline(time.Now().Add(c.o.timeout))
	return st, roundTrip(conn, payload, buf)
}

// -- connrate -----------------------------------------------------------------------------

type tally struct {
	count     int
	resumed   int
	errors    map[string]int
	firstErr  map[string]string
	latencies []time.Duration
	state     *tls.ConnectionState
}

func (c *client) worker(end time.Time, t *tally) {
	payload := make([]byte, c.o.size)
	for i := range payload {
		payload[i] = 'x'
	}
	buf := make([]byte, c.o.size)
	for time.Now().Before(end) {
		t0 := time.Now()
		st, e := c.once(payload, buf)
		done := time.Now()
		if e != nil {
			t.errors[e.kind]++
			if _, seen := t.firstErr[e.kind]; !seen {
				t.firstErr[e.kind] = e.Error()
			}
			time.Sleep(time.Millisecond) // as the Python load side: no hot loop on a refusal
			continue
		}
		if done.After(end) {
			continue // finished after the window: not counted
		}
		t.count++
		t.latencies = append(t.latencies, done.Sub(t0))
		if st != nil {
			if st.DidResume {
				t.resumed++
			}
			if t.state == nil {
				t.state = st
			}
		}
	}
}

func (c *client) connRate() (map[string]any, error) {
	tallies := make([]tally, c.o.concurrency)
	var wg sync.WaitGroup
	cpu0, t0 := cpuSeconds(), time.Now()
	end := t0.Add(c.o.duration)
	for i := range tallies {
		tallies[i] = tally{errors: map[string]int{}, firstErr: map[string]string{}}
		wg.Add(1)
		go func(t *tally) {
			defer wg.Done()
			c.worker(end, t)
		}(&tallies[i])
	}
	// The CPU of the window itself; connections in flight at its end finish afterwards.
	time.Sleep(time.Until(end))
	cpu, wall := cpuSeconds()-cpu0, time.Since(t0)
	wg.Wait()

	total := tally{errors: map[string]int{}, firstErr: map[string]string{}}
	for i := range tallies {
		t := &tallies[i]
		total.count += t.count
		total.resumed += t.resumed
		total.latencies = append(total.latencies, t.latencies...)
		for k, n := range t.errors {
			total.errors[k] += n
			if _, seen := total.firstErr[k]; !seen {
				total.firstErr[k] = t.firstErr[k]
			}
		}
		if total.state == nil {
			total.state = t.state
		}
	}
	errs, first := 0, ""
	for _, k := range sortedKeys(total.errors) {
		errs += total.errors[k]
		if first == "" {
			first = total.firstErr[k]
		}
	}
	res := map[string]any{
		"count":            total.count,
		"errors":           errs,
		"errors_by_kind":   total.errors,
		"first_error":      first,
		"cpu_s":            cpu,
		"wall_s":           wall.Seconds(),
		"concurrency":      c.o.concurrency,
		"resumed":          total.resumed,
		"conn_latency_ms":  percentiles(total.latencies, time.Millisecond),
		"full_handshakes":  c.cfg != nil && total.resumed == 0,
		"tls":              describe(total.state),
		"payload_bytes":    c.o.size,
		"session_resuming": c.o.resume,
	}
	return res, nil
}

func sortedKeys(m map[string]int) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	return keys
}

func describe(st *tls.ConnectionState) any {
	if st == nil {
		return nil
	}
	versions := map[uint16]string{
		tls.VersionTLS12: "TLSv1.2", tls.VersionTLS13: "TLSv1.3",
	}
	v, ok := versions[st.Version]
	if !ok {
		v = fmt.Sprintf("%#04x", st.Version)
	}
	return map[string]any{"version": v, "cipher": tls.CipherSuiteName(st.CipherSuite)}
}

// -- rtt ----------------------------------------------------------------------------------

func (c *client) prepareRTT() (func() (map[string]any, error), error) {
	conn, st, e := c.dial()
	if e != nil {
		return nil, e
	}
	payload := make([]byte, c.o.size)
	for i := range payload {
		payload[i] = 'r'
	}
	buf := make([]byte, c.o.size)
	trip := func() *opError {
		_ = conn.SetDeadline(time.Now().Add(c.o.timeout))
		return roundTrip(conn, payload, buf)
	}
	for i := 0; i < c.o.warmup; i++ {
		if e := trip(); e != nil {
			conn.Close()
			return nil, e
		}
	}
	return func() (map[string]any, error) {
		defer conn.Close()
		samples := make([]time.Duration, 0, c.o.count)
		over := 0
		cpu0 := cpuSeconds()
		for i := 0; i < c.o.count; i++ {
			t0 := time.Now()
			if e := trip(); e != nil {
				return nil, e
			}
			d := time.Since(t0)
			if d > time.Millisecond {
				over++
			}
			samples = append(samples, d)
		}
		cpu := cpuSeconds() - cpu0
		res := percentiles(samples, time.Microsecond)
		res["over_1ms"] = over
		res["cpu_s"] = cpu
		res["tls"] = describe(st)
		return res, nil
	}, nil
}

// -- throughput ---------------------------------------------------------------------------

func (c *client) prepareThroughput() (func() (map[string]any, error), error) {
	conn, st, e := c.dial()
	if e != nil {
		return nil, e
	}
	block := make([]byte, 1<<20)
	for i := range block {
		block[i] = byte(i)
	}
	if c.o.echo {
		block[0] = 'E' // the backend echoes unless the first byte is S
	}
	return func() (map[string]any, error) {
		defer conn.Close()
		// Bounded by the bytes to move: the deadline allows at least 1 MiB/s.
		_ = conn.SetDeadline(time.Now().Add(c.o.timeout + time.Duration(c.o.bytes>>20)*time.Second))
		cpu0, t0 := cpuSeconds(), time.Now()
		var counted int64
		var err error
		if c.o.echo {
			counted, err = c.echo(conn, block)
		} else {
			counted, err = c.sink(conn, block)
		}
		if err != nil {
			return nil, err
		}
		secs := time.Since(t0).Seconds()
		return map[string]any{
			"bytes_sent":            c.o.bytes,
			"bytes_counted_far_end": counted,
			"seconds":               secs,
			"cpu_s":                 cpuSeconds() - cpu0,
			"echo":                  c.o.echo,
			"tls":                   describe(st),
		}, nil
	}, nil
}

func (c *client) send(conn net.Conn, block []byte) error {
	for left := c.o.bytes; left > 0; {
		n := int64(len(block))
		if left < n {
			n = left
		}
		if _, err := conn.Write(block[:n]); err != nil {
			return fail("write", err)
		}
		left -= n
	}
	return nil
}

// sink sends the bytes to the backend's counting sink; returns the count it answers.
func (c *client) sink(conn net.Conn, block []byte) (int64, error) {
	head := make([]byte, 9)
	head[0] = 'S'
	binary.BigEndian.PutUint64(head[1:], uint64(c.o.bytes))
	if _, err := conn.Write(head); err != nil {
		return 0, fail("write", err)
	}
	if err := c.send(conn, block); err != nil {
		return 0, err
	}
	answer := make([]byte, 8)
	if _, err := io.ReadFull(conn, answer); err != nil {
		return 0, fail("read", err)
	}
	return int64(binary.BigEndian.Uint64(answer)), nil
}

// echo sends the bytes and reads them back at the same time; returns the bytes read back.
func (c *client) echo(conn net.Conn, block []byte) (int64, error) {
	sent := make(chan error, 1)
	go func() { sent <- c.send(conn, block) }()
	buf := make([]byte, 256<<10)
	var got int64
	for got < c.o.bytes {
		n, err := conn.Read(buf)
		got += int64(n)
		if err != nil {
			<-sent
			return got, fail("read", err)
		}
	}
	if err := <-sent; err != nil {
		return got, err
	}
	return got, nil
}

// -- backend ------------------------------------------------------------------------------

func serveBackend(line []byte) error {
	var m material
	if err := json.Unmarshal(line, &m); err != nil {
		return fmt.Errorf("key material on stdin is not JSON: %w", err)
	}
	cert, err := tls.X509KeyPair([]byte(m.CertPEM), []byte(m.PrivateKeyPEM))
	if err != nil {
		return fmt.Errorf("leaf (CertPEM, PrivateKeyPEM): %w", err)
	}
	roots := x509.NewCertPool()
	if !roots.AppendCertsFromPEM([]byte(m.RootsPEM)) {
		return errors.New("roots: no certificate in RootsPEM")
	}
	cfg := &tls.Config{
		Certificates: []tls.Certificate{cert},
		MinVersion:   tls.VersionTLS12,
		ClientAuth:   tls.RequireAndVerifyClientCert, // a client leaf from the roots
		ClientCAs:    roots,
	}
	plain, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return err
	}
	secure, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return err
	}
	stop := make(chan os.Signal, 1)
	signal.Notify(stop, syscall.SIGTERM, syscall.SIGINT)
	go accept(plain, nil)
	go accept(secure, cfg)
	fmt.Printf("READY plain=%d tls=%d\n",
		plain.Addr().(*net.TCPAddr).Port, secure.Addr().(*net.TCPAddr).Port)
	<-stop
	plain.Close()
	secure.Close()
	return nil
}

func accept(ln net.Listener, cfg *tls.Config) {
	for {
		conn, err := ln.Accept()
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			fmt.Fprintf(os.Stderr, "[WARN] goload: accept: %v\n", err)
			time.Sleep(10 * time.Millisecond) // out of descriptors: no hot loop
			continue
		}
		go echoOrSink(conn, cfg)
	}
}

// echoOrSink serves one connection: the counting sink when it starts with `S` and an
// 8-byte length (the count is answered once that many bytes have arrived), else an echo.
// It ends when the client closes (idle echo connections are kept as long as the client
// keeps them: the idle-memory window needs that).
func echoOrSink(conn net.Conn, cfg *tls.Config) {
	defer conn.Close()
	if cfg != nil {
		_ = conn.SetDeadline(time.Now().Add(10 * time.Second))
		tc := tls.Server(conn, cfg)
		if err := tc.Handshake(); err != nil {
			return
		}
		_ = conn.SetDeadline(time.Time{})
		conn = tc
	}
	buf := make([]byte, 64<<10)
	n, _ := conn.Read(buf)
	if n == 0 {
		return
	}
	if buf[0] != 'S' {
		if _, err := conn.Write(buf[:n]); err != nil {
			return
		}
		_, _ = io.CopyBuffer(conn, conn, buf) // echo until EOF
		return
	}
	for n < 9 {
		m, err := conn.Read(buf[n:])
		n += m
		if err != nil {
			return
		}
	}
	need, got := binary.BigEndian.Uint64(buf[1:9]), uint64(n-9)
	for got < need {
		m, err := conn.Read(buf)
		got += uint64(m)
		if err != nil {
			return
		}
	}
	answer := make([]byte, 8)
	binary.BigEndian.PutUint64(answer, got)
	if _, err := conn.Write(answer); err != nil {
		return
	}
	_, _ = io.Copy(io.Discard, conn) // until the client closes
}
