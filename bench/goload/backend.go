// goload's backend mode: the echo-or-sink servers at the far end of the load side.

package main

import (
	"crypto/tls"
	"crypto/x509"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/signal"
	"syscall"
	"time"
)

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
