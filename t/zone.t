#!/usr/bin/perl
# edge_zone and edge_status configuration errors, and a zone too small for the table: the
# edge says so once and keeps routing with per-worker health for what does not fit.

use strict;
use warnings;
use Test::More;
use Edge::Test qw(http_get wait_for);

my $t = Edge::Test->new;
my $n = 120;
my $upstreams = join ",\n", map {
    my $i = $_;
    qq{    "u$i": {"servers": ["127.0.0.1:%%PORT_b%%", "127.0.0.2:%%PORT_b%%", "127.0.0.3:%%PORT_b%%"]}}
} 1 .. $n;
my $routes = join ",\n", map { qq{    "r$_.test": "u$_"} } 1 .. $n;
$t->write_routes('routes.json', "{\n  \"upstreams\": {\n$upstreams\n  },\n  \"routes\": {\n$routes\n  }\n}\n");

my $frame = <<'EOF';
    edge_routes %%TESTDIR%%/routes.json;
    %%ZONE%%
    server { listen 127.0.0.1:%%PORT_edge%%; edge_route http; proxy_pass $edge_upstream; }
    server { listen 127.0.0.1:%%PORT_status%%; edge_status; %%STATUS_EXTRA%% }
    server { listen 127.0.0.1:%%PORT_b%%; return "b"; }
EOF
sub conf {
    my ($zone, $status_extra) = @_;
    (my $c = $frame) =~ s/%%ZONE%%/$zone/;
    $c =~ s/%%STATUS_EXTRA%%/$status_extra \/\/ ''/e;
    $t->config($c);
}

my @bad = (
    ['edge_zone z 1k;', qr/invalid edge_zone size "1k": at least \d+k/, 'a zone below 8 pages'],
    ['edge_zone z big;', qr/invalid edge_zone size "big"/, 'a size that is no size'],
    ['edge_zone a 64k; edge_zone b 64k;', qr/"edge_zone" directive is duplicate/, 'two zones'],
);
for my $case (@bad) {
    conf($case->[0]);
    my ($ok, $out) = $t->test_config;
    ok(!$ok, "nginx -t refuses $case->[2]");
    like($out, $case->[1], "$case->[2]: message");
}
conf('', 'proxy_pass 127.0.0.1:1;');
my ($ok, $out) = $t->test_config;
ok(!$ok, 'nginx -t refuses edge_status with proxy_pass');
like($out, qr/"edge_status" cannot be used with "proxy_pass" or "return" in the same server/, 'message');

conf('edge_zone small 32k;');
my $from = length $t->read_file('error.log');
$t->run;
my $status = $t->port('status');
$t->wait_for_log(qr/edge_zone "small" is full \((\d+) records\): (\d+) servers keep per-worker health state/);
my ($capacity, $left) = $t->read_file('error.log') =~ /is full \((\d+) records\): (\d+) servers/;
cmp_ok($left, '>', 0, "$left of " . 3 * $n . " servers did not fit in $capacity records");
my $st = Edge::Test::status_json($status);
is($st->{zone}{capacity}, $capacity, 'status gives the capacity');
is($st->{zone}{used}, $capacity, 'every record in use: the index, not spare records, keeps searches short');
my @unshared = grep { !$_->{shared} } map { @{$st->{upstreams}{"u$_"}{servers}} } 1 .. $n;
is(scalar @unshared, $left, 'status shows which servers are not shared');
is(http_get($t->port('edge'), "r$_.test"), 'b', "r$_.test still routed") for 1, $n;
like($t->read_file('error.log'), qr/worker process \d+/, 'workers run');
unlike(substr($t->read_file('error.log'), $from), qr/\[(alert|crit|emerg)\]/, 'nothing worse than a warning');

done_testing;
