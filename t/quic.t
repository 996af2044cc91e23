#!/usr/bin/perl
# QUIC on a UDP listener (`edge_route quic`), routed by the SNI of the client's Initial
# packets and passed through untouched: real HTTP/3 clients and servers (aioquic), QUIC
# versions 1 and 2, a ClientHello over two datagrams in either order, many clients at once.

use strict;
use warnings;
use Test::More;
use FindBin;
use Edge::Test qw(wait_for);

my $python = Edge::Test::quic_python()
    or plan skip_all => 'aioquic is not installed (nginx-test/prereqs makes a virtualenv with it)';
my $peer = "$FindBin::Bin/../nginx-test/quic/peer.py";

my $t = Edge::Test->new;
my ($crt, $key) = $t->certificate('backend');

# Starts a peer; returns its pid once it printed "ready".
my @peers;
sub peer {
    my (@args) = @_;
    pipe(my $r, my $w) or die "pipe: $!\n";
    my $pid = fork // die "fork: $!\n";
    if (!$pid) {
        close $r;
        open STDOUT, '>&', $w;
        open STDERR, '>>', $t->dir . '/peers.log';
        exec $python, $peer, @args;
        POSIX::_exit(127);
    }
    close $w;
    my $line = <$r>;
    ($line // '') =~ /^ready/ or die "peer @args did not start: " . $t->read_file('peers.log');
    push @peers, $pid;
    return $pid;
}
END { local $?; kill 'TERM', @peers; waitpid($_, 0) for @peers }
require POSIX;

# One HTTP/3 GET per connection; the bodies (or errors), one per line.
sub get {
    my ($port, $sni, @opts) = @_;
    my $out = `$python $peer get $port $sni @opts 2>>${\$t->dir}/peers.log`;
    return [split /\n/, $out];
}

peer('server', $t->port($_), "cluster-$_", $crt, $key) for qw(a b);
$t->write_routes('routes.json', <<"EOF2");
{
  "upstreams": {
    "a": {"servers": ["127.0.0.1:${\$t->port('a')}"]},
    "b": {"servers": ["127.0.0.1:${\$t->port('b')}"]}
  },
  "routes": {"a.test": "a", "b.test": "b", "*.b.test": "b"},
  "default": "a"
}
EOF2
$t->config(<<'EOF2', workers => 2);
    edge_routes %%TESTDIR%%/routes.json interval=100ms;
    server {
        listen 127.0.0.1:%%PORT_edge%% udp reuseport;
        edge_route quic;
        proxy_pass nginx_edge;
        proxy_timeout 2s;
        access_log %%TESTDIR%%/quic.log edge;
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

unlike($t->read_file('error.log'), qr/\[(alert|crit|emerg)\]/, 'nothing worse than an error');
done_testing;
