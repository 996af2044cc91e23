#!/usr/bin/perl
# edge_status keeps one answer per request: bytes or a half-close that arrive from the client
# while a large answer is still being written do not make it start another one.

use strict;
use warnings;
use Test::More;
use IO::Socket::INET;
use Socket qw(SOL_SOCKET SO_RCVBUF MSG_PEEK MSG_DONTWAIT SHUT_WR);
use Edge::Test qw(read_until_closed wait_for);

my $t = Edge::Test->new;

sub table {
    my ($n) = @_;
    my $ups = join ",\n", map { qq{    "upstream-number-$_": {"servers": ["127.0.0.1:%%PORT_b%%"]}} } 1 .. $n;
    my $routes = join ",\n", map { qq{    "r$_.test": "upstream-number-$_"} } 1 .. $n;
    return "{\n  \"upstreams\": {\n$ups\n  },\n  \"routes\": {\n$routes\n  }\n}\n";
}
$t->write_routes('routes.json', table(400));
$t->config(<<'EOF');
    edge_routes %%TESTDIR%%/routes.json interval=100ms;
    # A small send buffer: the answer (hundreds of kilobytes) leaves in many writes.
    server { listen 127.0.0.1:%%PORT_status%% sndbuf=4k; edge_status; }
    server { listen 127.0.0.1:%%PORT_b%%; return "b"; }
EOF
$t->run;

# A client that reads nothing yet, with a small receive buffer.
my $s = IO::Socket::INET->new(Proto => 'tcp') or die "socket: $!\n";
setsockopt($s, SOL_SOCKET, SO_RCVBUF, pack('l', 4096)) or die "SO_RCVBUF: $!\n";
$s->connect(Socket::pack_sockaddr_in($t->port('status'), Socket::inet_aton('127.0.0.1')))
    or die "connect: $!\n";
syswrite($s, "GET /status HTTP/1.1\r\nHost: edge\r\n\r\n");
wait_for(sub {
    my $peek = '';
    recv($s, $peek, 16, MSG_PEEK | MSG_DONTWAIT);
    length $peek;
}, 'the answer to start');

# The table changes meanwhile: an answer made now would differ.
$t->write_routes('routes.json', table(600));
$t->wait_for_log(qr/table 2 in service/);

# More bytes, then a half-close, while the answer is under way.
syswrite($s, "extra bytes after the request\r\n");
shutdown($s, SHUT_WR);
my $got = read_until_closed($s, 30);

my ($head, $body) = split /\r\n\r\n/, $got, 2;
like($head, qr{^HTTP/1\.1 200 OK\r\n}, 'one answer, 200');
my ($length) = $head =~ /\r\nContent-Length: (\d+)/;
cmp_ok(length($body // ''), '>', 100_000, 'a large answer');
is(length($body // ''), $length, 'the body is exactly as long as Content-Length says');
my $json = eval { require JSON::PP; JSON::PP::decode_json($body) };
ok($json, 'the body is one well-formed JSON document') or diag($@);
is($json && $json->{sources}[0]{generation}, 1, 'made once, before the table changed');
is(scalar keys %{$json ? $json->{upstreams} : {}}, 400, 'with the table of that moment');
unlike($t->read_file('error.log'), qr/\[(alert|crit|emerg)\]/, 'nothing worse than an error');

done_testing;
