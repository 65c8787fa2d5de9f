package route

import (
	"crypto/md5"
	"encoding/binary"
	"net/netip"
	"slices"
	"strconv"
)

// The Dovecot 2.3 director ring, reproduced bit for bit so that a site that
// moves from Dovecot's director to usher keeps every user on the backend the
// director would have chosen. Confirmed against dovecot/core
// src/director/mail-host.c (2.3, copyright 2010-2018):
//
//   - mail_vhost_add: a host whose down flag is set, or whose tag is not the
//     ring's tag, adds nothing; otherwise it adds vhost_count points, so a
//     host with vhost_count 0 adds none either. Down and weight-0 hosts are
//     therefore left off the ring entirely (not merely skipped at lookup).
//   - point i of a host hashes MD5(ip_str "-" i) where ip_str is
//     net_ip2addr() (libc inet_ntop, no brackets, no zone) and i is "%u",
//     and the point's hash is the first 4 digest bytes read big-endian. No
//     0 -> 1 substitution is applied to point hashes.
//   - mail_tag_vhosts_sort_ring sorts with mail_vhost_cmp: by hash, then by
//     net_ip_cmp of the host IPs (address family first, AF_INET < AF_INET6,
//     then memcmp of the network-order bytes), i.e. IPv4 before IPv6, then
//     by bytes. This is netip.Addr.Compare for addresses without a zone.
//   - mail_host_get_by_hash_ring runs array_bsearch_insert_pos (lib/
//     bsearch-insert-pos.c) for the user hash and wraps an index equal to
//     the ring length to 0. That search stops at the first probed point
//     whose hash equals the user hash; dovecotSearch copies its probing
//     order so that even hash collisions between hosts resolve the same way.
//   - every tag has its own ring; a request with no tag uses the "" ring.
//
// The user hash is UserHash of the expanded director_username_hash
// template (src/director/director.c director_get_username_hash calls
// mail_user_hash). In 2.3 the ring is always used; the 2.2-era
// director_consistent_hashing=no mode no longer exists.

// dovecotRing is the sorted ring of one tag.
type dovecotRing struct {
	hashes []uint32     // point hashes, ascending
	owner  []netip.Addr // owner[i] is the backend of point i
}

// dovecotPoint is one ring point while building.
type dovecotPoint struct {
	hash uint32
	addr netip.Addr // without zone, for sorting
	back netip.Addr // as configured, returned by Pick
}

// buildDovecotRing builds the ring from the eligible backends of one tag.
// pointHash is dovecotPointHash except in tests that need collisions.
func buildDovecotRing(backends []Backend, pointHash func(ip string, i int) uint32) *dovecotRing {
	n := 0
	for _, b := range backends {
		n += b.Weight
	}
	pts := make([]dovecotPoint, 0, n)
	for _, b := range backends {
		ip := dovecotIPString(b.Addr)
		unzoned := b.Addr.WithZone("")
		for i := range b.Weight {
			pts = append(pts, dovecotPoint{hash: pointHash(ip, i), addr: unzoned, back: b.Addr})
		}
	}
	slices.SortFunc(pts, func(a, b dovecotPoint) int {
		switch {
		case a.hash < b.hash:
			return -1
		case a.hash > b.hash:
			return 1
		}
		return a.addr.Compare(b.addr)
	})
	r := &dovecotRing{hashes: make([]uint32, len(pts)), owner: make([]netip.Addr, len(pts))}
	for i, p := range pts {
		r.hashes[i] = p.hash
		r.owner[i] = p.back
	}
	return r
}

// pick returns the backend for a user hash; false if the ring is empty.
func (r *dovecotRing) pick(userHash uint32) (netip.Addr, bool) {
	if len(r.hashes) == 0 {
		return netip.Addr{}, false
	}
	idx := dovecotSearch(r.hashes, userHash)
	if idx == len(r.hashes) {
		idx = 0
	}
	return r.owner[idx], true
}

// dovecotSearch is Dovecot's bsearch_insert_pos over ascending hashes: the
// index of a probed point equal to key, or else the insert position (the
// first point greater than key, possibly len(hashes)). Only the equal case
// differs from sort.Search, and only when several points share a hash.
func dovecotSearch(hashes []uint32, key uint32) int {
	left, right := 0, len(hashes)
	for left < right {
		idx := int(uint(left+right) >> 1)
		switch h := hashes[idx]; {
		case h < key:
			left = idx + 1
		case h > key:
			right = idx
		default:
			return idx
		}
	}
	return left
}

// dovecotPointHash is the hash of point i of the host whose address string
// is ip: the first 4 bytes, big-endian, of MD5("<ip>-<i>").
func dovecotPointHash(ip string, i int) uint32 {
	buf := make([]byte, 0, len(ip)+24)
	buf = append(buf, ip...)
	buf = append(buf, '-')
	buf = strconv.AppendInt(buf, int64(i), 10)
	sum := md5.Sum(buf)
	return binary.BigEndian.Uint32(sum[:4])
}

// dovecotIPString is the address as Dovecot's net_ip2addr prints it with
// glibc's inet_ntop: like netip.Addr.String without the zone, except that
// glibc also prints the deprecated IPv4-compatible form ::a.b.c.d (first 96
// bits zero, bits 96-111 not zero) with a dotted quad, where Go prints hex
// groups. IPv4-mapped addresses (::ffff:a.b.c.d) print the same in both.
func dovecotIPString(a netip.Addr) string {
	a = a.WithZone("")
	if a.Is6() && !a.Is4In6() {
		b := a.As16()
		compat := true
		for _, x := range b[:12] {
			if x != 0 {
				compat = false
				break
			}
		}
		if compat && (b[12] != 0 || b[13] != 0) {
			return "::" + netip.AddrFrom4([4]byte(b[12:16])).String()
		}
	}
	return a.String()
}
