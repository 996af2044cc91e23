#!/usr/bin/perl
# Balancing with health: least_conn by the connections of all workers, hash stable per
# client and moving only the clients of a server that goes down, backups only once every
# primary is down, fail open when every server is down, and proxy_next_upstream_tries.

use strict;
use warnings;
use Test::More;
use IO::Socket::INET;
use IO::Select;
use Edge::Test qw(http_get http_request raw_exchange wait_for);

my $t = Edge::Test->new;
$t->write_routes('routes.json', <<'EOF');
{
  "upstreams": {
    "lc": {"servers": ["127.0.0.1:%%PORT_la%%", "127.0.0.1:%%PORT_lb%%"], "balance": "least_conn"},
    "hs": {"servers": ["127.0.0.1:%%PORT_ha%%", "127.0.0.1:%%PORT_hb%%", "127.0.0.1:%%PORT_hc%%"],
           "balance": "hash"},
    "bk": {"servers": ["127.0.0.1:%%PORT_primary%%", {"address": "127.0.0.1:%%PORT_spare%%", "backup": true}]},
    "fo": {"servers": ["127.0.0.1:%%PORT_fx%%", "127.0.0.1:%%PORT_fy%%"],
           "check": {"type": "tcp", "interval": "300ms", "rise": 100, "fall": 1}},
    "tries": {"servers": ["127.0.0.1:%%PORT_c1%%", "127.0.0.1:%%PORT_c2%%", "127.0.0.1:%%PORT_ok%%"],
              "max_fails": 0},
    "slow": {"servers": ["127.0.0.1:%%PORT_bh1%%", "127.0.0.1:%%PORT_bh2%%", "127.0.0.1:%%PORT_ok%%"],
             "max_fails": 0}
  },
  "routes": {"lc.test": "lc", "hs.test": "hs", "bk.test": "bk", "fo.test": "fo", "tries.test": "tries", "slow.test": "slow"}
}
EOF
$t->backend($_, mode => 'hold') for qw(la lb);
$t->backend($_) for qw(ha hb hc primary fx fy);
$t->config(<<'EOF', workers => 2);
    edge_routes %%TESTDIR%%/routes.json interval=100ms;
    server { listen 127.0.0.1:%%PORT_edge%% reuseport; edge_route http; proxy_pass $edge_upstream; }
    server { listen 127.0.0.1:%%PORT_tries%% reuseport; edge_route http; proxy_pass $edge_upstream;
             proxy_next_upstream_tries 2; }
    server { listen 127.0.0.1:%%PORT_slow%% reuseport; edge_route http; proxy_pass $edge_upstream;
             proxy_connect_timeout 300ms; proxy_next_upstream_timeout 500ms; }
    server { listen 127.0.0.1:%%PORT_pp%% proxy_protocol; edge_route http; proxy_pass $edge_upstream; }
    server { listen 127.0.0.1:%%PORT_status%%; edge_status; }
    server { listen 127.0.0.1:%%PORT_spare%%; return "spare"; }
    server { listen 127.0.0.1:%%PORT_ok%%; return "ok"; }
EOF
$t->run;
my $edge = $t->port('edge');
my $status = $t->port('status');
my $state = sub { Edge::Test::server_state($status, @_) // {} };

# --- least_conn: held connections through the edge, two workers.
sub hold {
    my $s = IO::Socket::INET->new(PeerAddr => "127.0.0.1:$edge", Timeout => 10) or die "connect: $!";
    syswrite($s, http_request('lc.test'));
    my $sel = IO::Select->new($s);
    $sel->can_read(20) or die "no answer";
    sysread($s, my $name, 100);
    return ($s, $name);
}
my (%held, %count);
for (1 .. 4) {
    my ($s, $name) = hold();
    push @{$held{$name}}, $s;
    $count{$name}++;
}
is_deeply(\%count, {la => 2, lb => 2}, 'least_conn spreads held connections evenly');
my ($la, $lb) = ($t->port('la'), $t->port('lb'));
close $_ for @{delete $held{la}};
wait_for(sub { $state->('lc', "127.0.0.1:$la")->{active} == 0 }, 'la has no connection left');
is($state->('lc', "127.0.0.1:$lb")->{active}, 2, 'lb still holds 2, counted across workers');
my @next = map { my ($s, $name) = hold(); push @{$held{$name}}, $s; $name } 1 .. 2;
is_deeply(\@next, ['la', 'la'], 'the next two connections go to the server with fewer, whichever worker takes them');
close $_ for map { @$_ } values %held;

# --- hash: a client keeps its server; only the clients of a stopped server move.
my @clients = map { "127.0.0.$_" } 10 .. 25;
my %home;
for my $ip (@clients) {
    my @got = map { http_get($edge, 'hs.test', local => $ip) } 1 .. 3;
    is_deeply([@got[1, 2]], [$got[0], $got[0]], "client $ip stays on $got[0]");
    $home{$ip} = $got[0];
}
my %used = map { $_ => 1 } values %home;
cmp_ok(scalar keys %used, '>=', 2, 'clients are spread over the servers');

# Behind a load balancer speaking PROXY protocol, the client is the header's source address.
my $pp = $t->port('pp');
my %pp_home;
for my $i (1 .. 12) {
    my $src = "10.9.0.$i";
    my @got = map {
        raw_exchange($pp, ["PROXY TCP4 $src 127.0.0.1 " . (40000 + $_) . " 80\r\n" . http_request('hs.test')])
    } 1 .. 2;
    $pp_home{$src} = $got[0] if $got[0] eq $got[1];
}
is(scalar keys %pp_home, 12, 'each PROXY protocol source keeps its server');
my %pp_used = map { $_ => 1 } values %pp_home;
cmp_ok(scalar keys %pp_used, '>=', 2, 'and the sources are spread, although they all come from 127.0.0.1');
my ($victim) = sort { scalar(grep { $home{$_} eq $b } @clients) <=> scalar(grep { $home{$_} eq $a } @clients) }
    keys %used;
$t->stop_backend($victim);
my $moved_right = 1;
for my $ip (@clients) {
    my $now = http_get($edge, 'hs.test', local => $ip);
    if ($home{$ip} eq $victim) {
        $moved_right &&= $now ne $victim && $now ne '';
    } else {
        $moved_right &&= $now eq $home{$ip};
    }
}
ok($moved_right, "with $victim stopped, only its clients move");

# --- backup: only once every primary is down.
my $primary = $t->port('primary');
is(http_get($edge, 'bk.test'), 'primary', 'the primary serves while it is up') for 1 .. 3;
$t->stop_backend('primary');
is(http_get($edge, 'bk.test'), 'spare', 'the backup takes over when the primary fails');
my $mark = length $t->read_file('access.log');
is(http_get($edge, 'bk.test'), 'spare', 'and keeps serving while it is down') for 1 .. 6;
wait_for(sub { scalar(() = substr($t->read_file('access.log'), $mark) =~ /name=bk\.test/g) == 6 }, 'log');
unlike(substr($t->read_file('access.log'), $mark), qr/addr=\S*:$primary\b/, 'the down primary is not tried');

# --- fail open: both servers down by check (rise 100 keeps them down), one answers anyway.
my ($fx, $fy) = ($t->port('fx'), $t->port('fy'));
$t->stop_backend('fx');
$t->stop_backend('fy');
wait_for(sub { $state->('fo', "127.0.0.1:$fx")->{state} eq 'down'
        && $state->('fo', "127.0.0.1:$fy")->{state} eq 'down' }, 'fx and fy down');
$t->backend('fy');
is(http_get($edge, 'fo.test'), 'fy', 'every server down: they are tried anyway');
$t->wait_for_log(qr/every server of upstream "fo" is down, trying them anyway/);
wait_for(sub { $state->('fo', "127.0.0.1:$fy")->{state} eq 'checking' }, 'fy rising');
ok($state->('fo', "127.0.0.1:$fy")->{down}, 'fy passes its checks but stays down until rise');

# Six sessions to $name on $port: their access-log lines, and the most servers one tried.
sub sessions {
    my ($port, $name) = @_;
    my $mark = length $t->read_file('access.log');
    http_get($port, $name) for 1 .. 6;
    wait_for(sub { scalar(() = substr($t->read_file('access.log'), $mark) =~ /name=\Q$name\E /g) == 6 }, 'log');
    my @lines = substr($t->read_file('access.log'), $mark) =~ /(name=\Q$name\E .*)/g;
    my $most = 0;
    for (@lines) { my ($addr) = /addr=(.*?) status/; my $n = 1 + (() = $addr =~ /,/g); $most = $n if $n > $most }
    return ($most, @lines);
}

# --- proxy_next_upstream_tries bounds the retries (max_fails 0: no passive marking).
my ($max, @lines) = sessions($t->port('tries'), 'tries.test');
is($max, 2, 'at most 2 tries per session, as proxy_next_upstream_tries says');
ok((grep { /status=502/ } @lines), 'a session that meets two refusing servers gets 502');

# --- proxy_next_upstream_timeout: servers whose accept queue is full drop SYNs, so connects
# time out (300ms); after two, 600ms have passed, more than the 500ms allowed for retries.
my @blackholes;
for my $name (qw(bh1 bh2)) {
    my $l = IO::Socket::INET->new(Listen => 1, LocalAddr => '127.0.0.1', LocalPort => $t->port($name),
        ReuseAddr => 1) or die "$name: $!";
    my @fill;
    for (1 .. 8) {
        my $s = IO::Socket::INET->new(PeerAddr => '127.0.0.1', PeerPort => $t->port($name),
            Blocking => 0) or last;
        push @fill, $s;
    }
    push @blackholes, $l, @fill;
    ok(!IO::Socket::INET->new(PeerAddr => '127.0.0.1', PeerPort => $t->port($name), Timeout => 1),
        "$name does not complete connects");
}
my ($most, @slow) = sessions($t->port('slow'), 'slow.test');
is($most, 2, 'no third try once proxy_next_upstream_timeout has passed');
ok((grep { /addr=\S+, \S+ status=502/ } @slow), 'two timed-out connects: 502');
like($t->read_file('error.log'), qr/upstream timed out \(110: Connection timed out\) while connecting to upstream/,
    'the connects timed out');

done_testing;
