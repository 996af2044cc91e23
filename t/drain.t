#!/usr/bin/perl
# edge_drain_timeout: when a new table moves a host to another upstream or removes a server,
# new connections go to the new place at once; connections already open keep transferring,
# then are closed once the timeout passes (logged once per server). A connection whose route
# and server stay is never closed. Without the directive nothing is closed (t/k8s-nodes.t:
# a cordoned node's connection keeps transferring).

use strict;
use warnings;
use Test::More;
use IO::Socket::INET;
use Time::HiRes qw(time);
use Edge::Test qw(wait_for);

my $t = Edge::Test->new;
$t->backend($_, mode => 'echo') for qw(b1 b2 b3 b4 b5);
my $routes = sub {
    my ($moved, @removed) = @_;
    my $list = join ', ', map { "\"127.0.0.1:%%PORT_$_%%\"" } @removed;
    $t->write_routes('routes.json.tmp', <<"EOF");
{"upstreams": {"um": {"servers": ["127.0.0.1:%%PORT_b1%%"]}, "uv": {"servers": ["127.0.0.1:%%PORT_b2%%"]},
               "ur": {"servers": [$list]}, "uk": {"servers": ["127.0.0.1:%%PORT_b5%%"]}},
 "routes": {"moved.test": "$moved", "removed.test": "ur", "kept.test": "uk"}}
EOF
    rename $t->dir . '/routes.json.tmp', $t->dir . '/routes.json' or die "rename: $!\n";
};
$routes->('um', 'b3', 'b4');
$t->config(<<'EOF');
    edge_routes %%TESTDIR%%/routes.json interval=100ms;
    edge_drain_timeout 20s;
    server { listen 127.0.0.1:%%PORT_edge%%; edge_route http; proxy_pass $edge_upstream; }
EOF
$t->run;
my $edge = $t->port('edge');

# A connection through the edge: the backend's name, then whatever it echoes.
my $open = sub {
    my ($host) = @_;
    my $s = IO::Socket::INET->new(PeerAddr => "127.0.0.1:$edge", Timeout => 10) or return;
    print $s "GET / HTTP/1.1\r\nHost: $host\r\n\r\n";
    my $got = '';
    my $deadline = time + 10;
    while (length $got < 2 && time < $deadline) {
        sysread($s, my $buf, 2 - length $got) or last;
        $got .= $buf;
    }
    return ($got, $s);
};
# Whether a connection still carries bytes both ways.
my $echoes = sub {
    my ($s, $text) = @_;
    print $s $text or return 0;
    my $got = '';
    my $deadline = time + 10;
    while (index($got, $text) < 0 && time < $deadline) {
        sysread($s, my $buf, 4096) or return 0;
        $got .= $buf;
    }
    return index($got, $text) >= 0;
};
my $closed = sub {
    my ($s) = @_;
    my $sel = IO::Select->new($s);
    return 0 unless $sel->can_read(0);
    my $n = sysread($s, my $buf, 4096);
    return !$n;
};
require IO::Select;

my ($to_moved, $moved) = $open->('moved.test');
is($to_moved, 'b1', 'moved.test goes to b1');
my ($to_removed, $removed) = $open->('removed.test');
like($to_removed, qr/^b[34]$/, "removed.test goes to $to_removed");
my ($to_kept, $kept) = $open->('kept.test');
is($to_kept, 'b5', 'kept.test goes to b5');

# moved.test now goes to uv; the server removed.test went to leaves ur.
my $stays = $to_removed eq 'b3' ? 'b4' : 'b3';
$routes->('uv', $stays);
$t->wait_for_log(qr/upstream "um" server 127\.0\.0\.1:\d+: 1 open connection\(s\) to drain \(its route moved\), closed in 20000ms/);
pass('a route moved: its open connection is to drain, logged');
$t->wait_for_log(qr/upstream "ur" server 127\.0\.0\.1:\d+: 1 open connection\(s\) to drain \(the server was removed\)/);
pass('a server removed: likewise');
is(($open->('moved.test'))[0], 'b2', 'a new connection to moved.test goes to the new upstream at once');
is(($open->('removed.test'))[0], $stays, 'a new connection to removed.test to the server that stays');
ok($echoes->($moved, "one\n"), 'the connection on the old route keeps transferring');
ok($echoes->($removed, "two\n"), 'so does the one to the removed server');

wait_for(sub { $closed->($moved) && $closed->($removed) }, 'both closed after edge_drain_timeout', 60);
pass('after edge_drain_timeout, both are closed');
like($t->read_file('error.log'), qr/closing a connection kept past edge_drain_timeout/, 'and each is logged');
ok($echoes->($kept, "three\n"), 'a connection whose route and server stay is never closed');
close $_ for $moved, $removed, $kept;

my @alerts = grep { /\[(alert|crit|emerg)\]/ } split /\n/, $t->read_file('error.log');
is_deeply(\@alerts, [], 'no alert in error.log');
$t->stop;

for my $bad ('0', 'soon', '2d') {
    my $u = Edge::Test->new;
    $u->write_routes('routes.json', '{}');
    $u->config(<<"EOF");
    edge_routes %%TESTDIR%%/routes.json;
    edge_drain_timeout $bad;
    server { listen 127.0.0.1:%%PORT_edge%%; edge_route http; proxy_pass \$edge_upstream; }
EOF
    my ($ok, $out) = $u->test_config;
    ok(!$ok && $out =~ /edge_drain_timeout: invalid time "\Q$bad\E"/, "nginx -t refuses edge_drain_timeout $bad")
        or diag $out;
}
done_testing;
