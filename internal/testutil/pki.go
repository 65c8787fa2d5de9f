package testutil

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"math/big"
	"net"
	"testing"
	"time"
)

// PKI is a throwaway certificate authority and one server certificate it
// signed, valid from an hour ago for two hours.
type PKI struct {
	// Pool trusts the CA (and so the server certificate).
	Pool *x509.CertPool
	// Cert is the server certificate with its key.
	Cert tls.Certificate
	// Server serves Cert; the same pointer on every use, so tests can
	// check that a config was passed through.
	Server *tls.Config
}

// PKIOptions name what the server certificate is valid for.
type PKIOptions struct {
	DNSNames []string
	IPs      []net.IP
}

// LoopbackPKI returns a PKI whose server certificate is valid for
// 127.0.0.1, 127.0.0.2, 127.0.0.3 and localhost.
func LoopbackPKI(t testing.TB) *PKI {
	t.Helper()
	return NewPKI(t, PKIOptions{
		DNSNames: []string{"localhost"},
		IPs:      []net.IP{net.IPv4(127, 0, 0, 1), net.IPv4(127, 0, 0, 2), net.IPv4(127, 0, 0, 3)},
	})
}

// NewPKI makes a CA and a server certificate for o's names (ECDSA P-256).
func NewPKI(t testing.TB, o PKIOptions) *PKI {
	t.Helper()
	now := time.Now()
	caKey := newKey(t)
	caTmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: "usher test CA"},
		NotBefore:             now.Add(-time.Hour),
		NotAfter:              now.Add(time.Hour),
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	if err != nil {
		t.Fatalf("create test CA: %v", err)
	}
	ca, err := x509.ParseCertificate(caDER)
	if err != nil {
		t.Fatalf("parse test CA: %v", err)
	}
	leafKey := newKey(t)
	leafTmpl := &x509.Certificate{
		SerialNumber: big.NewInt(2),
		Subject:      pkix.Name{CommonName: "usher test server"},
		NotBefore:    now.Add(-time.Hour),
		NotAfter:     now.Add(time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		DNSNames:     o.DNSNames,
		IPAddresses:  o.IPs,
	}
	leafDER, err := x509.CreateCertificate(rand.Reader, leafTmpl, ca, &leafKey.PublicKey, caKey)
	if err != nil {
		t.Fatalf("create test server certificate: %v", err)
	}
	leaf, err := x509.ParseCertificate(leafDER)
	if err != nil {
		t.Fatalf("parse test server certificate: %v", err)
	}
	pool := x509.NewCertPool()
	pool.AddCert(ca)
	cert := tls.Certificate{Certificate: [][]byte{leafDER}, PrivateKey: leafKey, Leaf: leaf}
	return &PKI{
		Pool:   pool,
		Cert:   cert,
		Server: &tls.Config{MinVersion: tls.VersionTLS12, Certificates: []tls.Certificate{cert}},
	}
}

// Client returns a client config trusting the CA, verifying serverName
// ("" leaves it to the dialer or tls.Client's caller).
func (p *PKI) Client(serverName string) *tls.Config {
	return &tls.Config{RootCAs: p.Pool, ServerName: serverName}
}

func newKey(t testing.TB) *ecdsa.PrivateKey {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatalf("generate test key: %v", err)
	}
	return key
}
