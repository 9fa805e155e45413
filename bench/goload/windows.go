// The client side of goload's windows: one connection, connrate, rtt and throughput.

package main

import (
	"crypto/tls"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"sort"
	"sync"
	"time"
)

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
