#!/usr/bin/perl
# HTTP listener: routing by Host (or the absolute-form target), on the wire.

use strict;
use warnings;
use Test::More;
use IO::Socket::INET;
use Edge::Test qw(http_get raw_exchange wait_for);

my $t = Edge::Test->new;
$t->write_routes('routes.json', <<'EOF');
{
  "upstreams": {
    "a": {"servers": ["127.0.0.1:%%PORT_a%%"]},
    "b": {"servers": ["127.0.0.1:%%PORT_b%%"]},
    "v6": {"servers": ["127.0.0.1:%%PORT_v6%%"]},
    "tlsonly": {"servers": ["127.0.0.1:%%PORT_c%%"]},
    "fallback": {"servers": ["127.0.0.1:%%PORT_fallback%%"]}
  },
  "routes": {
    "a.example.com": "a",
    "*.example.com": "b",
    "127.0.0.1": "a",
    "split.example.com": {"tls": "tlsonly"}
  },
  "default": {"http": "fallback"}
}
EOF
$t->config(<<'EOF');
    edge_routes %%TESTDIR%%/routes.json;
    server { listen 127.0.0.1:%%PORT_edge%%; edge_route http; proxy_pass $edge_upstream; }
    server { listen 127.0.0.1:%%PORT_auto%%; edge_route auto; proxy_pass $edge_upstream; }
    server { listen 127.0.0.1:%%PORT_slow%%; edge_route http; proxy_pass $edge_upstream;
             preread_timeout 500ms; }
    server { listen 127.0.0.1:%%PORT_a%%; return "backend-a"; }
    server { listen 127.0.0.1:%%PORT_b%%; return "backend-b"; }
    server { listen 127.0.0.1:%%PORT_c%%; return "backend-c"; }
    server { listen 127.0.0.1:%%PORT_v6%%; return "backend-v6"; }
    server { listen 127.0.0.1:%%PORT_fallback%%; return "backend-fallback"; }
EOF
$t->run;
my $edge = $t->port('edge');

is(http_get($edge, 'a.example.com'), 'backend-a', 'Host header');
is(http_get($edge, 'A.EXAMPLE.com.:8080'), 'backend-a', 'case, trailing dot and port removed');
is(http_get($edge, 'x.example.com'), 'backend-b', 'wildcard');
is(http_get($edge, '127.0.0.1:80'), 'backend-a', 'IPv4 literal');
is(http_get($edge, 'other.test', target => 'http://a.example.com:80/x'), 'backend-a',
    'absolute-form target wins over Host');
is(http_get($edge, undef, version => '1.0'), 'backend-fallback', 'HTTP/1.0 without Host: default');
is(http_get($edge, 'a.example.com', version => '1.0'), 'backend-a', 'HTTP/1.0 with Host');
is(http_get($edge, 'split.example.com'), 'backend-b',
    'a route without an http upstream falls through to the wildcard');
is(http_get($edge, 'nowhere.test'), 'backend-fallback', 'unknown name takes the default');
is(http_get($edge, 'a b.example.com'), 'backend-fallback', 'a host with a space is no name');
is(http_get($edge, '../etc'), 'backend-fallback', 'a host with .. is no name');
$t->wait_for_log(qr/edge: invalid host name, routing as a connection without a name/);

my $head = "GET /.well-known/acme-challenge/token HTTP/1.1\r\nHost: a.example.com:5002\r\n"
    . "User-Agent: Go-http-client/1.1\r\nAccept-Encoding: gzip\r\n\r\n";
is(raw_exchange($edge, [unpack('(a7)*', $head)], pause => 0.01), 'backend-a',
    'request head split over many segments');
is(raw_exchange($edge, ["\x16\x03\x01\x00\x05hello"]), 'backend-fallback', 'TLS bytes on the HTTP listener');

# auto: the first byte decides.
my $auto = $t->port('auto');
is(http_get($auto, 'split.example.com'), 'backend-b', 'auto listener: HTTP');
use Edge::Test qw(client_hello tls_records);
is(raw_exchange($auto, [tls_records(client_hello(sni => 'split.example.com'))]), 'backend-c',
    'auto listener: TLS');

$t->wait_for_log(qr/proto=http name=a\.example\.com route=a\.example\.com upstream=nginx_edge alpn= addr=127\.0\.0\.1:\d+ status=200/, 'access.log');
like($t->read_file('access.log'), qr/proto=tls name=split\.example\.com route=split\.example\.com/, 'auto logged as tls');
unlike($t->read_file('error.log'), qr/\[(alert|crit|emerg)\]|no host in upstream/, 'no alerts in error.log');

# A head that never completes is closed at preread_timeout, and that is logged with the client.
my $slow = $t->port('slow');
my $mark = length $t->read_file('error.log');
is(raw_exchange($slow, ["GET / HTTP/1.1\r\nHost: a.exa"], timeout => 20), '', 'an incomplete head is closed');
wait_for(sub { substr($t->read_file('error.log'), $mark)
        =~ /\[info\] .* edge: no complete HTTP request head within preread_timeout, closed.*client: 127\.0\.0\.1, server: 127\.0\.0\.1:$slow/ },
    'timeout logged');
pass('the preread timeout is logged, with the client address');
$mark = length $t->read_file('error.log');
close(IO::Socket::INET->new(PeerAddr => "127.0.0.1:$slow") or die "connect: $!");
wait_for(sub { substr($t->read_file('error.log'), $mark)
        =~ /edge: the client closed before sending a complete HTTP request head.*client: 127\.0\.0\.1, server: 127\.0\.0\.1:$slow/ },
    'early close logged');
pass('a client that closes before a whole head is logged too');
unlike(substr($t->read_file('error.log'), $mark), qr/within preread_timeout/, 'and not as a timeout');

done_testing;
