// Command goref is the benchmark's reference proxy: the connection path of Consul's built-in
// Go proxy (`consul connect proxy`), written with the Go standard library only, so that
// connect-proxy can be compared with crypto/tls and goroutines in the same run.
//
// It is not Consul's code: it does, per connection, what Consul's proxy does.
//
//	inbound:  mTLS listener presenting the service leaf; a client certificate is required,
//	          its chain is verified against the roots, its URI SAN must be a Connect service
//	          SPIFFE ID, and the agent is asked, during the handshake, with
//	          POST /v1/agent/connect/authorize {Target, ClientCertURI, ClientCertSerial};
//	          a denial fails the handshake. Then the plain backend is dialed and bytes are
//	          copied both ways.
//	outbound: plain listener; each connection goes to an instance of the upstream service
//	          from /v1/health/connect/<name>?passing, dialed with mTLS (our leaf as client
//	          certificate); the server's chain is verified against the roots and its URI SAN
//	          must be spiffe://<trust domain>/ns/default/dc/<dc>/svc/<name>.
//
// Key material (leaf certificate, key and roots, PEM) is read as one JSON object from
// standard input, never from a file:
//
//	{"CertPEM": "...", "PrivateKeyPEM": "...", "RootsPEM": "..."}
//
// When it listens (and, outbound, knows an instance), it prints one line
// `READY listen=<addr> gomaxprocs=<n>` and serves until SIGTERM or SIGINT.
package main

import (
	"bytes"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log"
	"math/big"
	"math/rand"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/signal"
	"regexp"
	"runtime"
	"strconv"
	"sync"
	"syscall"
	"time"
)

const (
	handshakeTimeout = 10 * time.Second
	dialTimeout      = 10 * time.Second
	agentTimeout     = 10 * time.Second
)

var serviceID = regexp.MustCompile(`^(?:/ap/[^/]+)?/ns/[^/]+/dc/[^/]+/svc/[^/]+$`)

type material struct {
	CertPEM       string
	PrivateKeyPEM string
	RootsPEM      string
}

type options struct {
	mode         string
	listen       string
	agent        string
	service      string
	backend      string
	upstream     string
	trustDomain  string
	discovery    string
	sessionCache bool
	idleConns    int
}

func main() {
	var o options
	flag.StringVar(&o.mode, "mode", "", "inbound or outbound")
	flag.StringVar(&o.listen, "listen", "127.0.0.1:0", "address to listen on")
	flag.StringVar(&o.agent, "agent", "", "host:port of the agent's HTTP API")
	flag.StringVar(&o.service, "service", "", "inbound: the service this proxy fronts (authorize Target)")
	flag.StringVar(&o.backend, "backend", "", "inbound: host:port of the plain backend")
	flag.StringVar(&o.upstream, "upstream", "", "outbound: name of the destination service")
	flag.StringVar(&o.trustDomain, "trust-domain", "", "outbound: trust domain of the expected server URI")
	flag.StringVar(&o.discovery, "discovery", "watch",
		"outbound: `watch` (one blocking query loop, as connect-proxy) or `per-conn` "+
			"(one health query per connection, as Consul's proxy)")
	flag.BoolVar(&o.sessionCache, "session-cache", false,
		"outbound: resume TLS sessions to upstreams (Consul's proxy does not)")
	flag.IntVar(&o.idleConns, "agent-idle-conns", 64, "idle keep-alive connections kept to the agent")
	flag.Parse()
	log.SetFlags(log.LstdFlags | log.Lmicroseconds)
	log.SetOutput(os.Stderr)

	if err := run(o); err != nil {
		log.Printf("[ERROR] goref: %v", err)
		os.Exit(1)
	}
}

func run(o options) error {
	if o.agent == "" {
		return errors.New("-agent is required")
	}
	raw, err := io.ReadAll(io.LimitReader(os.Stdin, 1<<20))
	if err != nil {
		return fmt.Errorf("reading key material from stdin: %w", err)
	}
	var m material
	if err := json.Unmarshal(raw, &m); err != nil {
		return fmt.Errorf("key material on stdin is not JSON: %w", err)
	}
	cert, err := tls.X509KeyPair([]byte(m.CertPEM), []byte(m.PrivateKeyPEM))
	if err != nil {
		return fmt.Errorf("leaf: %w", err)
	}
	roots := x509.NewCertPool()
	if !roots.AppendCertsFromPEM([]byte(m.RootsPEM)) {
		return errors.New("roots: no certificate in RootsPEM")
	}
	client := &http.Client{
		Timeout: agentTimeout,
		Transport: &http.Transport{
			Proxy:               nil, // the agent is local: never through an HTTP proxy
			DialContext:         (&net.Dialer{Timeout: dialTimeout, KeepAlive: 30 * time.Second}).DialContext,
			MaxIdleConns:        o.idleConns,
			MaxIdleConnsPerHost: o.idleConns,
			IdleConnTimeout:     90 * time.Second,
		},
	}
	agent := &agentAPI{base: "http://" + o.agent, client: client}

	ln, err := net.Listen("tcp", o.listen)
	if err != nil {
		return err
	}
	var handle func(net.Conn)
	switch o.mode {
	case "inbound":
		if o.service == "" || o.backend == "" {
			return errors.New("inbound needs -service and -backend")
		}
		handle = inbound(o, cert, roots, agent)
	case "outbound":
		if o.upstream == "" || o.trustDomain == "" {
			return errors.New("outbound needs -upstream and -trust-domain")
		}
		handle, err = outbound(o, cert, roots, agent)
		if err != nil {
			return err
		}
	default:
		return fmt.Errorf("-mode must be inbound or outbound, got %q", o.mode)
	}

	stop := make(chan os.Signal, 1)
	signal.Notify(stop, syscall.SIGTERM, syscall.SIGINT)
	go func() {
		<-stop
		ln.Close()
		os.Exit(0)
	}()
	fmt.Printf("READY listen=%s gomaxprocs=%d\n", ln.Addr(), runtime.GOMAXPROCS(0))
	return serve(ln, handle)
}

func serve(ln net.Listener, handle func(net.Conn)) error {
	for {
		conn, err := ln.Accept()
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return nil
			}
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				continue
			}
			log.Printf("[WARN] goref: accept: %v", err)
			time.Sleep(10 * time.Millisecond)
			continue
		}
		go handle(conn)
	}
}

// pipe copies both ways until one direction ends, then closes both (as Consul's proxy).
// Whichever copy ends first closes both connections, which ends the other copy too.
func pipe(a, b net.Conn) {
	done := make(chan struct{}, 1)
	go func() {
		_, _ = io.Copy(b, a)
		a.Close()
		b.Close()
		done <- struct{}{}
	}()
	_, _ = io.Copy(a, b)
	a.Close()
	b.Close()
	<-done
}

// -- identities ---------------------------------------------------------------------------

// verifyChain checks the peer's chain against the roots (any extended key usage: Connect
// leaves are used both ways) and returns the leaf.
func verifyChain(raw [][]byte, roots *x509.CertPool) (*x509.Certificate, error) {
	if len(raw) == 0 {
		return nil, errors.New("no peer certificate")
	}
	certs := make([]*x509.Certificate, len(raw))
	for i, der := range raw {
		c, err := x509.ParseCertificate(der)
		if err != nil {
			return nil, fmt.Errorf("peer certificate %d: %w", i, err)
		}
		certs[i] = c
	}
	inter := x509.NewCertPool()
	for _, c := range certs[1:] {
		inter.AddCert(c)
	}
	_, err := certs[0].Verify(x509.VerifyOptions{
		Roots:         roots,
		Intermediates: inter,
		KeyUsages:     []x509.ExtKeyUsage{x509.ExtKeyUsageAny},
	})
	if err != nil {
		return nil, err
	}
	return certs[0], nil
}

// serviceURI is the leaf's first URI SAN when it is a Connect service SPIFFE ID.
func serviceURI(leaf *x509.Certificate) (*url.URL, error) {
	if len(leaf.URIs) == 0 {
		return nil, errors.New("connect: invalid leaf certificate")
	}
	u := leaf.URIs[0]
	if u.Scheme != "spiffe" || !serviceID.MatchString(u.Path) {
		return nil, errors.New("connect: invalid leaf certificate URI")
	}
	return u, nil
}

// encodeSerial is Consul's encoding of a certificate serial: the minimal big-endian bytes
// as lowercase two-digit hex, joined by colons.
func encodeSerial(n *big.Int) string {
	const digits = "0123456789abcdef"
	b := n.Bytes()
	if len(b) == 0 {
		return ""
	}
	out := make([]byte, 0, 3*len(b)-1)
	for i, x := range b {
		if i > 0 {
			out = append(out, ':')
		}
		out = append(out, digits[x>>4], digits[x&0xf])
	}
	return string(out)
}

// -- the agent ----------------------------------------------------------------------------

type agentAPI struct {
	base   string
	client *http.Client
}

type authorizeAnswer struct {
	Authorized bool
	Reason     string
}

func (a *agentAPI) authorize(target, uri, serial string) error {
	body, err := json.Marshal(map[string]string{
		"Target":           target,
		"ClientCertURI":    uri,
		"ClientCertSerial": serial,
	})
	if err != nil {
		return err
	}
	resp, err := a.client.Post(a.base+"/v1/agent/connect/authorize", "application/json", bytes.NewReader(body))
	if err != nil {
		return fmt.Errorf("connect: authz call failed: %w", err)
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(io.LimitReader(resp.Body, 1<<16))
	if err != nil {
		return fmt.Errorf("connect: authz call failed: %w", err)
	}
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("connect: authz call failed: HTTP %d: %s", resp.StatusCode, bytes.TrimSpace(data))
	}
	var ans authorizeAnswer
	if err := json.Unmarshal(data, &ans); err != nil {
		return fmt.Errorf("connect: authz call failed: %w", err)
	}
	if !ans.Authorized {
		return errors.New("connect: authz denied: " + ans.Reason)
	}
	return nil
}

type instance struct {
	addr string // host:port
	dc   string
}

type healthEntry struct {
	Node struct {
		Address    string
		Datacenter string
	}
	Service struct {
		Address string
		Port    int
	}
}

// instances runs one health query; index > 0 makes it a blocking query.
func (a *agentAPI) instances(service string, index uint64, wait time.Duration) ([]instance, uint64, error) {
	u := a.base + "/v1/health/connect/" + url.PathEscape(service) + "?passing"
	timeout := agentTimeout
	if index > 0 {
		u += "&index=" + strconv.FormatUint(index, 10) + "&wait=" + strconv.Itoa(int(wait.Seconds())) + "s"
		timeout += wait + wait/16
	}
	req, err := http.NewRequest(http.MethodGet, u, nil)
	if err != nil {
		return nil, 0, err
	}
	client := *a.client
	client.Timeout = timeout
	resp, err := client.Do(req)
	if err != nil {
		return nil, 0, err
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(io.LimitReader(resp.Body, 16<<20))
	if err != nil {
		return nil, 0, err
	}
	if resp.StatusCode != http.StatusOK {
		return nil, 0, fmt.Errorf("health query: HTTP %d: %s", resp.StatusCode, bytes.TrimSpace(data))
	}
	var entries []healthEntry
	if err := json.Unmarshal(data, &entries); err != nil {
		return nil, 0, fmt.Errorf("health query: %w", err)
	}
	next, _ := strconv.ParseUint(resp.Header.Get("X-Consul-Index"), 10, 64)
	out := make([]instance, 0, len(entries))
	for _, e := range entries {
		host := e.Service.Address
		if host == "" {
			host = e.Node.Address
		}
		out = append(out, instance{net.JoinHostPort(host, strconv.Itoa(e.Service.Port)), e.Node.Datacenter})
	}
	return out, next, nil
}

// -- inbound ------------------------------------------------------------------------------

func inbound(o options, cert tls.Certificate, roots *x509.CertPool, agent *agentAPI) func(net.Conn) {
	cfg := &tls.Config{
		MinVersion:   tls.VersionTLS12, // TLS 1.3 is offered as well (Go's default maximum)
		Certificates: []tls.Certificate{cert},
		// The chain is verified below, against the roots, with any key usage; Consul's
		// proxy does the same in its own VerifyPeerCertificate.
		ClientAuth: tls.RequireAnyClientCert,
		VerifyPeerCertificate: func(raw [][]byte, _ [][]*x509.Certificate) error {
			leaf, err := verifyChain(raw, roots)
			if err != nil {
				return err
			}
			uri, err := serviceURI(leaf)
			if err != nil {
				return err
			}
			return agent.authorize(o.service, uri.String(), encodeSerial(leaf.SerialNumber))
		},
	}
	return func(conn net.Conn) {
		tc := tls.Server(conn, cfg)
		_ = tc.SetDeadline(time.Now().Add(handshakeTimeout))
		if err := tc.Handshake(); err != nil {
			// A peer that closes before saying anything is a TCP health check (the agent
			// probes sidecar ports): not worth a line.
			if !errors.Is(err, io.EOF) {
				log.Printf("[ERROR] goref: inbound handshake from %s: %v", conn.RemoteAddr(), err)
			}
			tc.Close()
			return
		}
		_ = tc.SetDeadline(time.Time{})
		dst, err := net.DialTimeout("tcp", o.backend, dialTimeout)
		if err != nil {
			log.Printf("[ERROR] goref: dialing the backend %s: %v", o.backend, err)
			tc.Close()
			return
		}
		pipe(tc, dst)
	}
}

// -- outbound -----------------------------------------------------------------------------

type watcher struct {
	mu   sync.RWMutex
	list []instance
}

func (w *watcher) pick() (instance, bool) {
	w.mu.RLock()
	defer w.mu.RUnlock()
	if len(w.list) == 0 {
		return instance{}, false
	}
	return w.list[rand.Intn(len(w.list))], true
}

func (w *watcher) run(agent *agentAPI, service string, index uint64) {
	for {
		list, next, err := agent.instances(service, index, 30*time.Second)
		if err != nil {
			log.Printf("[WARN] goref: watching %s: %v", service, err)
			time.Sleep(time.Second)
			continue
		}
		if next == 0 {
			time.Sleep(time.Second) // no index in the answer: poll
		}
		if next < index || next == 0 {
			next = 1 // the index went backwards: start over, as a blocking query should
		}
		index = next
		w.mu.Lock()
		w.list = list
		w.mu.Unlock()
	}
}

func outbound(o options, cert tls.Certificate, roots *x509.CertPool, agent *agentAPI) (func(net.Conn), error) {
	cfg := &tls.Config{
		MinVersion:   tls.VersionTLS12,
		Certificates: []tls.Certificate{cert},
		// No host name check: the identity is the URI SAN, compared after the handshake.
		InsecureSkipVerify: true,
		VerifyPeerCertificate: func(raw [][]byte, _ [][]*x509.Certificate) error {
			_, err := verifyChain(raw, roots)
			return err
		},
	}
	if o.sessionCache {
		cfg.ClientSessionCache = tls.NewLRUClientSessionCache(256)
	}

	var resolve func() (instance, error)
	switch o.discovery {
	case "watch":
		list, index, err := agent.instances(o.upstream, 0, 0)
		if err != nil {
			return nil, err
		}
		w := &watcher{list: list}
		go w.run(agent, o.upstream, index)
		resolve = func() (instance, error) {
			if in, ok := w.pick(); ok {
				return in, nil
			}
			return instance{}, fmt.Errorf("no healthy instance of %s", o.upstream)
		}
	case "per-conn":
		resolve = func() (instance, error) {
			list, _, err := agent.instances(o.upstream, 0, 0)
			if err != nil {
				return instance{}, err
			}
			if len(list) == 0 {
				return instance{}, fmt.Errorf("no healthy instance of %s", o.upstream)
			}
			return list[rand.Intn(len(list))], nil
		}
	default:
		return nil, fmt.Errorf("-discovery must be watch or per-conn, got %q", o.discovery)
	}

	return func(conn net.Conn) {
		in, err := resolve()
		if err != nil {
			log.Printf("[ERROR] goref: resolving %s: %v", o.upstream, err)
			conn.Close()
			return
		}
		raw, err := net.DialTimeout("tcp", in.addr, dialTimeout)
		if err != nil {
			log.Printf("[ERROR] goref: dialing %s: %v", in.addr, err)
			conn.Close()
			return
		}
		tc := tls.Client(raw, cfg)
		_ = tc.SetDeadline(time.Now().Add(handshakeTimeout))
		if err := tc.Handshake(); err != nil {
			log.Printf("[ERROR] goref: handshake with %s: %v", in.addr, err)
			tc.Close()
			conn.Close()
			return
		}
		_ = tc.SetDeadline(time.Time{})
		want := fmt.Sprintf("spiffe://%s/ns/default/dc/%s/svc/%s", o.trustDomain, in.dc, o.upstream)
		peers := tc.ConnectionState().PeerCertificates
		if len(peers) == 0 || len(peers[0].URIs) == 0 || peers[0].URIs[0].String() != want {
			log.Printf("[ERROR] goref: %s is not %s", in.addr, want)
			tc.Close()
			conn.Close()
			return
		}
		pipe(conn, tc)
	}, nil
}
