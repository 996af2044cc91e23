#!/usr/bin/perl
# A binary upgrade (USR2, then QUIT to the old master) with tables in service: the new
# master's workers serve at once, go on after the old ones are gone, and take changes.

use strict;
use warnings;
use Test::More;
use Edge::Test qw(http_get wait_for);

my $t = Edge::Test->new;
my $dir = $t->dir;
sub table { qq({"upstreams": {"a": {"servers": ["127.0.0.1:%%PORT_a%%"]}, "b": {"servers": ["127.0.0.1:%%PORT_b%%"]}},
 "routes": {"app.test": "$_[0]"}}) }
$t->write_routes('routes.json', table('a'));
$t->config(<<'EOF', workers => 2);
    edge_routes %%TESTDIR%%/routes.json interval=100ms;
    server { listen 127.0.0.1:%%PORT_edge%%; edge_route http; proxy_pass $edge_upstream; }
    server { listen 127.0.0.1:%%PORT_a%%; return "a"; }
    server { listen 127.0.0.1:%%PORT_b%%; return "b"; }
EOF
# A binary upgrade needs a daemon: nginx ignores USR2 while the process that started the
# master is still its parent.
my $conf = $t->read_file('nginx.conf');
$conf =~ s/daemon off;/daemon on;/;
$t->write_file('nginx.conf', $conf);
system($t->{binary}, '-p', "$dir/", '-c', "$dir/nginx.conf", '-e', "$dir/error.log") == 0
    or die "nginx did not start\n" . $t->read_file('error.log');
# Daemons are this script's to stop, whatever happens to it.
my @masters;
END { kill 'QUIT', grep { $_ } @masters }
my $pid_of = sub { open my $f, '<', $_[0] or return; my ($p) = <$f> =~ /(\d+)/; $p };
my $old;
wait_for(sub { $old = $pid_of->("$dir/nginx.pid") }, 'the master');
push @masters, $old;
my $edge = $t->port('edge');
wait_for(sub { http_get($edge, 'app.test') ne '' }, 'listening');
is(http_get($edge, 'app.test'), 'a', 'routed before the upgrade');

kill 'USR2', $old;
wait_for(sub { -e "$dir/nginx.pid.oldbin" }, 'the old master steps aside');
my $new;
wait_for(sub { $new = $pid_of->("$dir/nginx.pid"); $new && $new != $old }, 'the new master');
push @masters, $new;
wait_for(sub { scalar(() = $t->read_file('error.log') =~ /$new#\d+: start worker process/g) >= 2 }, 'its workers');
is(http_get($edge, 'app.test'), 'a', 'routed while both generations run');

kill 'QUIT', $old;
wait_for(sub { !kill 0, $old }, 'the old master gone');
my $streak = 0;
wait_for(sub { $streak = http_get($edge, 'app.test') eq 'a' ? $streak + 1 : 0; $streak >= 10 }, 'the new workers alone');
pass('the new workers serve alone');

$t->write_routes('routes.json', table('b'));
$streak = 0;
wait_for(sub { $streak = http_get($edge, 'app.test') eq 'b' ? $streak + 1 : 0; $streak >= 20 }, 'a change after the upgrade');
pass('a change after the upgrade reaches the new workers');
is(scalar(() = $t->read_file('error.log') =~ /table 2 loaded/g), 1, 'read once');
unlike($t->read_file('error.log'), qr/\[(alert|crit|emerg)\]/, 'no alerts');

kill 'QUIT', $new;
wait_for(sub { !kill 0, $new }, 'the new master stops');
done_testing;
