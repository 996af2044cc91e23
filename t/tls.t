#!/usr/bin/perl
# TLS listener: routing by SNI, on the wire, with split, multi-record and byte-by-byte hellos,
# hellos without SNI, garbage, and real TLS clients whose handshake reaches the backend intact.

use strict;
use warnings;
use Test::More;
use IO::Socket::SSL;
use Edge::Test qw(client_hello tls_records raw_exchange);

my $t = Edge::Test->new;
my $dir = $t->dir;
$t->certificate('backend', 'backend.test');

$t->write_routes('routes.json', <<'EOF');
{
  "upstreams": {
    "a": {"servers": ["127.0.0.1:%%PORT_a%%"]},
    "b": {"servers": ["127.0.0.1:%%PORT_b%%"]},
    "c": {"servers": ["127.0.0.1:%%PORT_c%%"]},
    "tlsback": {"servers": ["127.0.0.1:%%PORT_tlsback%%"]},
    "fallback": {"servers": ["127.0.0.1:%%PORT_fallback%%"]}
  },
  "routes": {
    "a.example.com": "a",
    "*.example.com": "b",
    "*.deep.example.com": "c",
    "real.test": "tlsback"
  },
  "default": "fallback"
}
EOF
$t->config(<<'EOF');
    edge_routes %%TESTDIR%%/routes.json;
    server { listen 127.0.0.1:%%PORT_edge%%; edge_route tls; proxy_pass $edge_upstream; }
    server { listen 127.0.0.1:%%PORT_small%%; edge_route tls; preread_buffer_size 512; proxy_pass $edge_upstream; }
    server { listen 127.0.0.1:%%PORT_a%%; return "backend-a"; }
    server { listen 127.0.0.1:%%PORT_b%%; return "backend-b"; }
    server { listen 127.0.0.1:%%PORT_c%%; return "backend-c"; }
    server { listen 127.0.0.1:%%PORT_fallback%%; return "backend-fallback"; }
    server {
        listen 127.0.0.1:%%PORT_tlsback%% ssl;
        ssl_certificate %%TESTDIR%%/backend.crt;
        ssl_certificate_key %%TESTDIR%%/backend.key;
        ssl_alpn h2 acme-tls/1;
        return "tls-backend sni=$ssl_server_name alpn=$ssl_alpn_protocol";
    }
EOF
$t->run;
my $edge = $t->port('edge');

sub via_hello { raw_exchange($edge, [tls_records(client_hello(@_))]) }

is(via_hello(sni => 'a.example.com'), 'backend-a', 'exact name');
is(via_hello(sni => 'A.Example.COM.'), 'backend-a', 'case and trailing dot ignored');
is(via_hello(sni => 'x.example.com'), 'backend-b', 'wildcard');
is(via_hello(sni => 'x.y.example.com'), 'backend-b', 'wildcard covers deeper names');
is(via_hello(sni => 'x.deep.example.com'), 'backend-c', 'longest wildcard suffix wins');
is(via_hello(sni => 'example.com'), 'backend-fallback', 'wildcard does not cover its suffix');
is(via_hello(sni => 'unknown.test'), 'backend-fallback', 'unknown name takes the default');
is(via_hello(), 'backend-fallback', 'no SNI takes the default');
is(via_hello(sni => 'bad name.test'), 'backend-fallback', 'an invalid name counts as no name');

# A post-quantum-sized hello (about 1.8 KB) in many forms.
my $big = client_hello(sni => 'a.example.com', alpn => ['h2'], pad => 1600);
ok(length($big) > 1700, 'hello is post-quantum sized');
my $one = tls_records($big);
is(raw_exchange($edge, [substr($one, 0, 700), substr($one, 700)], pause => 0.2), 'backend-a',
    'hello split over two segments');
is(raw_exchange($edge, [tls_records($big, 500)]), 'backend-a', 'hello split over four records');
is(raw_exchange($edge, [tls_records($big, 100)]), 'backend-a', 'hello split over 18 records');
my $records = tls_records($big, 300);
my @pieces = unpack('(a37)*', $records);
is(raw_exchange($edge, \@pieces, pause => 0.002), 'backend-a', 'records split across segments');
my $small = tls_records(client_hello(sni => 'x.deep.example.com'));
is(raw_exchange($edge, [split //, $small], pause => 0.001), 'backend-c', 'one byte per segment');

# Larger than preread_buffer_size: no name, so the default; not a crash, not an error close.
is(raw_exchange($t->port('small'), [$one]), 'backend-fallback', 'hello larger than the buffer');
$t->wait_for_log(qr/ClientHello larger than preread_buffer_size, routing as a connection without a name/);

is(raw_exchange($edge, ["GET / HTTP/1.1\r\nHost: a.example.com\r\n\r\n"]), 'backend-fallback',
    'HTTP on the TLS listener is a connection without a name');
is(raw_exchange($edge, ["\x80\x2e\x01\x03\x01\x00\x15" . ("\0" x 41)]), 'backend-fallback', 'SSLv2 hello');
$t->wait_for_log(qr/SSLv2-style hello/);

# Real clients: the handshake goes through the edge untouched, SNI and ALPN included.
my $c = IO::Socket::SSL->new(PeerAddr => "127.0.0.1:$edge", SSL_hostname => 'real.test',
    SSL_alpn_protocols => ['acme-tls/1'], SSL_verify_mode => SSL_VERIFY_NONE, Timeout => 10);
ok($c, 'IO::Socket::SSL handshake through the edge') or diag($SSL_ERROR);
my $reply = $c ? join('', <$c>) : '';
is($reply, 'tls-backend sni=real.test alpn=acme-tls/1', "backend saw the client's SNI and ALPN");
my $s_client = `echo | openssl s_client -connect 127.0.0.1:$edge -servername real.test -alpn h2 -ign_eof 2>/dev/null`;
like($s_client, qr/tls-backend sni=real.test alpn=h2/, 'openssl s_client through the edge');

$t->wait_for_log(qr/proto=tls name=real\.test route=real\.test upstream=nginx_edge alpn=acme-tls\/1 addr=127\.0\.0\.1:\d+ status=200/, 'access.log');
my $b = $t->port('b');
like($t->read_file('access.log'), qr/proto=tls name=x\.y\.example\.com route=\*\.example\.com upstream=nginx_edge alpn= addr=127\.0\.0\.1:$b status=200/,
    'variables in the access log for a wildcard route');
like($t->read_file('access.log'), qr/proto=tls name=- route=default upstream=nginx_edge/, 'a connection without a name is logged with name=- and the default route');
unlike($t->read_file('error.log'), qr/\[(alert|crit|emerg)\]|no host in upstream/, 'no alerts in error.log');

done_testing;
