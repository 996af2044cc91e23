#!/usr/bin/perl
# QUIC on a UDP listener (`edge_route quic`), routed by the SNI of the client's Initial
# packets and passed through untouched: real HTTP/3 clients and servers (aioquic), QUIC
# versions 1 and 2, a ClientHello over two datagrams in either order, many clients at once.

use strict;
use warnings;
use Test::More;
use Edge::Test qw(wait_for);
use IO::Select;
use IO::Socket::INET;

my $python = Edge::Test::quic_python()
    or plan skip_all => 'aioquic is not installed (nginx-test/prereqs makes a virtualenv with it)';
my $peer = Edge::Test::quic_peer_script();

my $t = Edge::Test->new;
my ($crt, $key) = $t->certificate('backend');

require POSIX;
sub peer { $t->quic_peer(@_) }

# One HTTP/3 GET per connection; the bodies (or errors), one per line.
sub get {
    my ($port, $sni, @opts) = @_;
    my $out = `$python $peer get $port $sni @opts 2>>${\$t->dir}/peers.log`;
    return [split /\n/, $out];
}

peer('server', $t->port($_), "cluster-$_", $crt, $key) for qw(a b);
# A server that answers a client's first Initial with a Retry: the client comes again with a
# new connection ID, on a session already routed.
peer('server', $t->port('c'), 'cluster-c', $crt, $key, '--retry');
# A recorder of the datagrams an upstream gets (the PROXY protocol case below).
my $recorder = IO::Socket::INET->new(LocalAddr => '127.0.0.1:' . $t->port('rec'), Proto => 'udp')
    or die "recorder: $!\n";

# A client's first flight as aioquic makes it, in datagrams.
sub first_flight {
    my (@args) = @_;
    return [map { pack 'H*', $_ } split /\n/, `$python $peer initials @args`];
}
$t->write_routes('routes.json', <<"EOF2");
{
  "upstreams": {
    "a": {"servers": ["127.0.0.1:${\$t->port('a')}"]},
    "b": {"servers": ["127.0.0.1:${\$t->port('b')}"]},
    "c": {"servers": ["127.0.0.1:${\$t->port('c')}"]},
    "rec": {"servers": ["127.0.0.1:${\$t->port('rec')}"]}
  },
  "routes": {"a.test": "a", "b.test": "b", "*.b.test": "b", "c.test": "c", "rec.test": "rec",
             "deny.test": {"upstream": "a", "limits": {"deny": ["127.0.0.0/8"]}}},
  "default": "a"
}
EOF2
$t->config(<<'EOF2', workers => 2, connections => 8192);
    edge_routes %%TESTDIR%%/routes.json interval=100ms;
    log_format ports '$remote_port $edge_server_name $status';
    server {
        listen 127.0.0.1:%%PORT_edge%% udp reuseport;
        edge_route quic;
        proxy_pass nginx_edge;
        proxy_timeout 2s;
        preread_timeout 2s;
        access_log %%TESTDIR%%/quic.log edge;
        access_log %%TESTDIR%%/ports.log ports;
    }
    server {
        listen 127.0.0.1:%%PORT_pp%% udp reuseport;
        edge_route quic;
        proxy_pass nginx_edge;
        proxy_protocol on;
        proxy_timeout 2s;
    }
EOF2
$t->run;
my $edge = $t->port('edge');

is_deeply(get($edge, 'a.test'), ['cluster-a'], 'a.test over QUIC v1 reaches cluster A');
is_deeply(get($edge, 'b.test'), ['cluster-b'], 'b.test reaches cluster B');
is_deeply(get($edge, 'x.b.test'), ['cluster-b'], 'a wildcard route');
is_deeply(get($edge, 'b.test', '--version', 2), ['cluster-b'], 'QUIC version 2');
is_deeply(get($edge, 'nobody.test'), ['cluster-a'], 'an unrouted name goes to the default route');

# A ClientHello of about 2.5 KB, as a post-quantum one: over two or three Initial datagrams.
is_deeply(get($edge, 'b.test', '--pad', 1400), ['cluster-b'], 'a hello over several datagrams');
is_deeply(get($edge, 'b.test', '--pad', 1400, '--version', 2), ['cluster-b'], 'and in QUIC v2');
# Through a relay that swaps the client's first two datagrams: the name arrives first or
# last, and the server must still get every datagram, in the order the relay sent them.
peer('relay', $t->port('relay'), $edge);
is_deeply(get($t->port('relay'), 'b.test', '--pad', 1400), ['cluster-b'],
    'its two datagrams swapped on the way');

# A session is logged when it ends: proxy_timeout after its last datagram.
my $log = wait_for(sub { my $l = $t->read_file('quic.log'); ($l =~ tr/\n//) >= 8 && $l }, 'the sessions logged');
like($log, qr/proto=quic name=b\.test route=b\.test upstream=nginx_edge alpn=h3\S* addr=127\.0\.0\.1:${\$t->port('b')} status=200/,
    'the access log: protocol quic, name, route, ALPN, server');

my @padded = $log =~ /^\S+ proto=quic name=b\.test .* alpn=(h3,x\S+) /mg;
is(scalar(grep { length > 1300 } @padded), 3, 'the padded hellos read whole (their ALPN lists of 1,400 bytes)');

# Many clients at once, over 2 workers.
my @kids;
for my $k (1 .. 4) {
    my $pid = fork // die "fork: $!\n";
    if (!$pid) {
        my $name = $k % 2 ? 'a.test' : 'b.test';
        my $want = $k % 2 ? 'cluster-a' : 'cluster-b';
        my $got = get($edge, $name, '--count', 10);
        POSIX::_exit((grep { $_ eq $want } @$got) == 10 ? 0 : 1);
    }
    push @kids, $pid;
}
my $failed = grep { waitpid($_, 0); $? != 0 } @kids;
is($failed, 0, '40 connections from 4 clients at once, each to its cluster');

# ngtcp2's client (Debian's ngtcp2-client, GnuTLS): another QUIC stack, another hello. It sends
# no SNI for an address (its --sni is not used for one), so it is given the name, which a hosts
# file of its own resolves: bind-mounted over /etc/hosts in a mount namespace of its own.
SKIP: {
    my ($ngtcp2) = grep { -x } '/usr/bin/gtlsclient';
    skip 'ngtcp2-client is not installed (apt-get install ngtcp2-client)', 2 unless $ngtcp2;
    skip 'ngtcp2: a mount namespace for its hosts file needs root and unshare', 2
        unless $> == 0 && system('unshare -m true 2>/dev/null') == 0;
    my $hosts = $t->write_file('hosts', "127.0.0.1 a.test b.test\n");
    for my $n (qw(a b)) {
        my $dir = $t->dir . "/ngtcp2-$n";
        mkdir $dir;
        system('timeout', '30', 'unshare', '-m', 'sh', '-c',
            "mount --bind $hosts /etc/hosts && exec $ngtcp2 -q --exit-on-all-streams-close --timeout=10s"
            . " --download=$dir $n.test $edge https://$n.test/ >>${\$t->dir}/ngtcp2.log 2>&1");
        is($t->read_file("ngtcp2-$n/index.html"), "cluster-$n", "ngtcp2's client: $n.test reaches cluster " . uc $n);
    }
}

# A version this module cannot read goes to the default route, whose server answers with a
# Version Negotiation packet; bytes that are not QUIC are dropped.
{
    my $s = IO::Socket::INET->new(PeerAddr => "127.0.0.1:$edge", Proto => 'udp') or die "udp: $!\n";
    my $dcid = "\x11" x 8;
    $s->send(pack('C N C a8 C', 0xc0, 0x1a2a3a4a, 8, $dcid, 0) . ("\0" x 1180));
    my $answer = '';
    my $sel = IO::Select->new($s);
    $s->recv($answer, 1500) if $sel->can_read(10);
    my ($first, $version, $dlen) = unpack('C N C', $answer);
    ok(defined $version && $first & 0x80 && $version == 0 && index(substr($answer, 7), pack('N', 1)) >= 0,
        'an unknown version reaches the default server, which answers with a Version Negotiation');
    my $g = IO::Socket::INET->new(PeerAddr => "127.0.0.1:$edge", Proto => 'udp') or die "udp: $!\n";
    $g->send("\x40 not a QUIC long header");
    $t->wait_for_log(qr/\[info\] .*edge: not a QUIC long header, dropped/);
    pass('bytes that are not QUIC are dropped, logged');
}

is_deeply(get($edge, 'c.test'), ['cluster-c'], 'a server that sends a Retry: the client comes again, routed');

# A refused client (deny) does not take other clients' datagrams with it: its session has
# no socket of its own to drain.
{
    my @socks = map { IO::Socket::INET->new(PeerAddr => "127.0.0.1:$edge", Proto => 'udp') or die } 1 .. 4;
    my ($denied, $allowed) = (first_flight('deny.test'), first_flight('a.test'));
    $socks[0]->send($denied->[0]);
    $_->send($allowed->[0]) for @socks[1 .. 3];
    my %port = map { $_->sockport => 1 } @socks[1 .. 3];
    wait_for(sub {
        my @seen = grep { $port{(split / /)[0]} && / a\.test 200$/ } split /\n/, $t->read_file('ports.log');
        @seen == 3;
    }, "the 3 clients after a refused one routed", 30);
    pass('3 clients right after a refused one are all routed');
    like($t->read_file('ports.log'), qr/^${\$socks[0]->sockport} deny\.test 403$/m, 'the refused one logged 403');
}

# With proxy_protocol, the header goes first, with the first datagram; the held one after.
{
    my $flight = first_flight('rec.test', '--pad', 1400);
    cmp_ok(scalar @$flight, '>=', 2, 'a first flight of two datagrams');
    my $s = IO::Socket::INET->new(PeerAddr => '127.0.0.1:' . $t->port('pp'), Proto => 'udp') or die;
    $s->send($_) for @$flight;
    my @got;
    my $sel = IO::Select->new($recorder);
    while (@got < @$flight && $sel->can_read(10)) {
        $recorder->recv(my $d, 65536);
        push @got, $d;
    }
    like($got[0] // '', qr/^PROXY TCP4 127\.0\.0\.1 127\.0\.0\.1 \d+ ${\$t->port('pp')}\r\n/,
        'the upstream gets the PROXY header first');
    is(length($got[0] // '') - index($got[0] // '', "\r\n") - 2, length $flight->[0], 'with the first datagram, whole');
    ok(defined $got[1] && $got[1] eq $flight->[1], 'then the held datagram, as it came');
}

# A client whose second datagram never comes (a relay drops it): closed at preread_timeout.
peer('relay', $t->port('dropping'), $edge, '--drop');
like(get($t->port('dropping'), 'b.test', '--pad', 1400, '--timeout', 4)->[0], qr/^error: /,
    'a client whose hello never completes gets no answer');
$t->wait_for_log(qr/\[info\] .*edge: no complete QUIC ClientHello within preread_timeout, closed/);
pass('and is closed at preread_timeout, logged');

# A table swap while a QUIC connection is open: it keeps its server; a new one follows.
my $long = fork // die "fork: $!\n";
if (!$long) {
    open STDOUT, '>', $t->dir . '/long.out' or die;
    open STDERR, '>>', $t->dir . '/peers.log';
    exec($python, $peer, 'get', $edge, 'b.test', '--requests', 8, '--pause', 0.5) or POSIX::_exit(127);
}
wait_for(sub { $t->read_file('long.out') =~ /\n/ }, 'the first answer on the long connection');
$t->swap_routes('routes.json', $t->read_file('routes.json') =~ s/"b\.test": "b"/"b.test": "a"/r, 2);
is_deeply(get($edge, 'b.test'), ['cluster-a'], 'after a swap, a new connection follows the table');
waitpid($long, 0);
is_deeply([split /\n/, $t->read_file('long.out')], [('cluster-b') x 8],
    'the connection open across the swap kept its server for its 8 requests');

# A flood of garbage and of Initial-looking datagrams that open with no key, from a new
# client every tenth datagram, while real clients connect: they all get through.
my @workers = $t->read_file('error.log') =~ /start worker process (\d+)/g;
my $flood = fork // die "fork: $!\n";
if (!$flood) {
    my $sent = `$python $peer flood $edge 6`;
    open my $f, '>', $t->dir . '/flood.out' or die;
    print $f $sent;
    close $f;
    POSIX::_exit(0);
}
my $during = get($edge, 'a.test', '--count', 20);
waitpid($flood, 0);
my ($sent) = $t->read_file('flood.out') =~ /(\d+)/;
note("flood: $sent datagrams in 6 s");
cmp_ok($sent, '>', 1000, 'the flood ran');
is(scalar(grep { $_ eq 'cluster-a' } @$during), 20, '20 connections answered during the flood');
my $rss = 0;
for my $pid (@workers) {
    open my $fh, '<', "/proc/$pid/status" or next;
    local $/;
    my ($v) = <$fh> =~ /VmRSS:\s+(\d+)/;
    $rss = $v if $v && $v > $rss;
}
note("largest worker RSS after the flood: $rss kB");
cmp_ok($rss, '<', 64 * 1024, 'workers stay under 64 MiB (11 MB measured)');
like($t->read_file('error.log'), qr/edge: QUIC Initial packet that does not open, dropped/,
    'the Initial-looking datagrams dropped');
# nginx -t warns of a udp listener without reuseport under several workers.
{
    my $u = Edge::Test->new;
    $u->write_routes('routes.json', '{"routes": {}}');
    for my $reuseport ('', ' reuseport') {
        $u->config(<<"EOF2", workers => 2);
    edge_routes %%TESTDIR%%/routes.json;
    server { listen 127.0.0.1:%%PORT_q%% udp$reuseport; edge_route quic; proxy_pass nginx_edge; }
EOF2
        my ($ok, $out) = $u->test_config;
        ok($ok, "nginx -t passes (udp$reuseport)") or diag $out;
        my $warned = $out =~ /\[warn\] edge_route quic: the udp listener on 127\.0\.0\.1:${\$u->port('q')} has no "reuseport" and there are 2 workers/;
        ok($reuseport ? !$warned : $warned, $reuseport ? 'no warning with reuseport' : 'a warning without reuseport')
            or diag $out;
    }
}

unlike($t->read_file('error.log'), qr/exited on signal/, 'no worker crashed');
unlike($t->read_file('error.log'), qr/\[(alert|crit|emerg)\]/, 'nothing worse than an error');
done_testing;
